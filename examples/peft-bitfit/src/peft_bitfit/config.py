"""``BitFitConfig``: which layers' biases train, and what to do with a target layer that has no bias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peft_core.config import LayerConfig
from peft_core.errors import ConfigError

MISSING_BIAS_CHOICES = ("add", "skip", "error")

# Every Linear-like layer of the transformer blocks: the paper trains all bias terms. Llama-family models
# have no biases at all, so there BitFit adds them (see ``missing_bias``).
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BERT_LIKE = ["query", "key", "value", "intermediate.dense", "output.dense"]  # not the pooler


@dataclass
class BitFitConfig(LayerConfig):
    """BitFit (Ben Zaken et al., 2021): only bias terms train.

    Each target layer gets a trainable vector ``delta`` with one entry per output feature, initialised at
    zero, and computes ``W x + b + delta``: the base layer, its bias included, is never changed, so the
    adapter is saved as its own tensor (``<layer>.bitfit_bias``) and removed exactly. Merging folds
    ``delta`` into the base bias.

    ``target_modules`` takes the usual forms; ``None`` picks every Linear-like layer of the transformer
    blocks for the model types in ``DEFAULT_TARGET_MODULES``.

    ``missing_bias`` says what happens to a target layer built without a bias (every Llama projection):
    ``"add"`` (the default) gives it a trainable bias starting at zero, ``"skip"`` leaves it out (an error
    if no target has a bias), ``"error"`` refuses the config for this model, naming the layers.
    """

    PEFT_TYPE: ClassVar[str] = "BITFIT"
    DEFAULT_TARGET_MODULES: ClassVar[dict[str, list[str]]] = {
        "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
        "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE,
        "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj: the attention's and the MLP's
        "bert": _BERT_LIKE, "roberta": _BERT_LIKE, "xlm-roberta": _BERT_LIKE,
        "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    }

    missing_bias: str = "add"

    def validate(self) -> None:
        super().validate()
        if self.missing_bias not in MISSING_BIAS_CHOICES:
            raise ConfigError(
                f"BitFitConfig.missing_bias must be one of {', '.join(map(repr, MISSING_BIAS_CHOICES))} (what to "
                f"do with a target layer that has no bias), not {self.missing_bias!r}."
            )
