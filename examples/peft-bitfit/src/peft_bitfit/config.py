"""``BitFitConfig``: which layers' biases train, and what to do with a target layer that has no bias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peft_core.config import LayerConfig
from peft_core.errors import ConfigError

MISSING_BIAS_CHOICES = ("add", "skip", "error")

# Every Linear-like layer of the transformer blocks, by model family: the paper trains all bias terms.
# Llama-family models have no biases at all, so there BitFit adds them (see ``missing_bias``). The plugin
# adds these to peft-core's default-targets table as the "bitfit" role.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BERT_LIKE = ["query", "key", "value", "intermediate.dense", "output.dense"]  # not the pooler
_FUSED_QKV = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
_ENCODER_DECODER = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
_DIFFUSERS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE, "gemma3_text": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj: the attention's and the MLP's
    "gpt_neox": _FUSED_QKV, "falcon": _FUSED_QKV,
    "bert": _BERT_LIKE, "roberta": _BERT_LIKE, "xlm-roberta": _BERT_LIKE,
    "vit": [*_BERT_LIKE, "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],  # transformers 4 and 5 names
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "opt": _ENCODER_DECODER, "bart": _ENCODER_DECODER, "whisper": _ENCODER_DECODER,
    **dict.fromkeys(("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"), _DIFFUSERS),
}


@dataclass
class BitFitConfig(LayerConfig):
    """BitFit (Ben Zaken et al., 2021): only bias terms train.

    Each target layer gets a trainable vector ``delta`` with one entry per output feature, initialised at
    zero, and computes ``W x + b + delta``: the base layer, its bias included, is never changed, so the
    adapter is saved as its own tensor (``<layer>.bitfit_bias``) and removed exactly. Merging folds
    ``delta`` into the base bias.

    ``target_modules`` takes the usual forms; ``None`` picks every Linear-like layer of the transformer
    blocks for the model families in ``DEFAULT_TARGETS``.

    ``missing_bias`` says what happens to a target layer built without a bias (every Llama projection):
    ``"add"`` (the default) gives it a trainable bias starting at zero, ``"skip"`` leaves it out (an error
    if no target has a bias), ``"error"`` refuses the config for this model, naming the layers.
    """

    PEFT_TYPE: ClassVar[str] = "BITFIT"
    DEFAULT_TARGETS_ROLE: ClassVar[str] = "bitfit"  # its column of peft-core's default-targets table

    missing_bias: str = "add"

    def validate(self) -> None:
        super().validate()
        if self.missing_bias not in MISSING_BIAS_CHOICES:
            raise ConfigError(
                f"BitFitConfig.missing_bias must be one of {', '.join(map(repr, MISSING_BIAS_CHOICES))} (what to "
                f"do with a target layer that has no bias), not {self.missing_bias!r}."
            )
