"""Tiny, randomly initialised models of the families the coverage matrix (test_model_coverage.py) runs on.

Each :class:`Family` builds its model from a config with a fixed seed, knows its task type, a fixed batch of
inputs and the loss to train on. :class:`FamilyCache` saves each model once per session and loads it back
with ``from_pretrained``, so every cell goes through the real loading path; cells get deep copies of the
loaded model, since methods change the model they wrap in place.

Widths are multiples of 64 wherever a Linear layer reads them: bitsandbytes' CPU 4-bit inference kernel
(the QLoRA cells) refuses other input widths.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
VOCAB = 128
BATCH, TOKENS, TARGET_TOKENS = 2, 6, 4
Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """A model family of the matrix: how to build its tiny model and how to feed and train it.

    ``kind``: ``"causal"``, ``"classifier"``, ``"seq2seq"``, ``"image"``, ``"speech"`` or ``"denoiser"``.
    ``task_type``: the adapter configs' task type (None for image classification and denoisers).
    ``head``: a task head trained in full with every adapter (``modules_to_save``) where no task type adds it,
    as users do for image classification.
    """

    name: str
    title: str
    kind: str
    task_type: str | None
    build: Callable[[], nn.Module]
    make_inputs: Callable[[torch.Generator], Inputs]
    head: tuple[str, ...] = ()

    @property
    def takes_tokens(self) -> bool:
        """Whether the model reads token ids, which soft prompts put virtual tokens in front of."""
        return self.kind in ("causal", "classifier", "seq2seq")

    def inputs(self) -> Inputs:
        """The fixed batch, with labels (denoisers: with ``target``, the output the loss compares with)."""
        return self.make_inputs(torch.Generator().manual_seed(SEED + 1))

    def call_inputs(self) -> Inputs:
        """The batch without what only the loss reads (labels, the denoiser's target)."""
        return {k: v for k, v in self.inputs().items() if k not in ("labels", "target")}

    def loss(self, model: nn.Module) -> torch.Tensor:
        if self.kind == "denoiser":
            return F.mse_loss(model(**self.call_inputs()).sample, self.inputs()["target"])
        return model(**self.inputs()).loss

    def outputs(self, model: nn.Module) -> torch.Tensor:
        """What the model computes on the batch: logits (of the real tokens only) or the denoised sample."""
        with torch.no_grad():
            out = model(**self.call_inputs())
        if self.kind == "denoiser":
            return out.sample
        logits = out.logits
        if self.kind == "causal":  # soft prompts add virtual positions in front of the real ones
            return logits[:, -self.inputs()["input_ids"].shape[1]:]
        return logits


# --- inputs ----------------------------------------------------------------------------------------------


def _tokens(generator: torch.Generator, length: int = TOKENS) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, length), generator=generator)


def causal_inputs(generator: torch.Generator) -> Inputs:
    input_ids = _tokens(generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


def classifier_inputs(generator: torch.Generator) -> Inputs:
    input_ids = _tokens(generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": torch.tensor([0, 2])}


def _with_decoder_inputs(inputs: Inputs, start: int) -> Inputs:
    """Decoder inputs (the labels shifted right), so that calls without labels compute the same logits."""
    labels = inputs["labels"]
    starts = torch.full((labels.shape[0], 1), start, dtype=labels.dtype)
    return {**inputs, "decoder_input_ids": torch.cat([starts, labels[:, :-1]], dim=1)}


def seq2seq_inputs(generator: torch.Generator) -> Inputs:
    input_ids = _tokens(generator)
    return _with_decoder_inputs({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                                 "labels": _tokens(generator, TARGET_TOKENS)}, start=0)


def image_inputs(generator: torch.Generator) -> Inputs:
    return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=generator), "labels": torch.tensor([0, 2])}


def speech_inputs(generator: torch.Generator) -> Inputs:
    # Whisper's encoder takes exactly 2 * max_source_positions frames of num_mel_bins features.
    return _with_decoder_inputs({"input_features": torch.randn(BATCH, 8, 16, generator=generator),
                                 "labels": _tokens(generator, TARGET_TOKENS)}, start=1)


def unet_inputs(generator: torch.Generator) -> Inputs:
    return {"sample": torch.randn(BATCH, 4, 8, 8, generator=generator), "timestep": torch.tensor([10, 700]),
            "encoder_hidden_states": torch.randn(BATCH, 5, 64, generator=generator),
            "target": torch.randn(BATCH, 4, 8, 8, generator=generator)}


def sd3_inputs(generator: torch.Generator) -> Inputs:
    # 16 channels in 2x2 patches: the output projection is 64 wide too.
    return {"hidden_states": torch.randn(BATCH, 16, 8, 8, generator=generator),
            "encoder_hidden_states": torch.randn(BATCH, 5, 64, generator=generator),
            "pooled_projections": torch.randn(BATCH, 64, generator=generator), "timestep": torch.tensor([10, 700]),
            "target": torch.randn(BATCH, 16, 8, 8, generator=generator)}


def flux_inputs(generator: torch.Generator) -> Inputs:
    image_tokens, text_tokens = 4, 3
    return {"hidden_states": torch.randn(BATCH, image_tokens, 64, generator=generator),
            "encoder_hidden_states": torch.randn(BATCH, text_tokens, 64, generator=generator),
            "pooled_projections": torch.randn(BATCH, 64, generator=generator),
            "timestep": torch.tensor([0.1, 0.7]),
            "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(2.0), torch.arange(2.0),
                                                  indexing="ij"), dim=-1).reshape(-1, 3),
            "txt_ids": torch.zeros(text_tokens, 3),
            "target": torch.randn(BATCH, image_tokens, 64, generator=generator)}


# --- models ----------------------------------------------------------------------------------------------

# The decoder-only families share one shape: hidden 64, 2 layers, 4 heads (2 key/value heads where the
# family has grouped-query attention), vocabulary 128.
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                num_labels=3)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_DECODER, num_key_value_heads=2))


def _mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_DECODER, num_key_value_heads=2, sliding_window=None))


def _qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_DECODER, num_key_value_heads=2))


def _gemma2() -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**_DECODER, num_key_value_heads=2, head_dim=16, sliding_window=16))


def _phi3() -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_DECODER, num_key_value_heads=2))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=1, eos_token_id=2))


def _gpt_neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(**_DECODER))


def _falcon() -> nn.Module:
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    ))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(**_ENCODER, max_position_embeddings=64))


def _roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    # Positions start after the padding index (1), so the table is longer than the longest input + 2.
    return RobertaForSequenceClassification(RobertaConfig(**_ENCODER, max_position_embeddings=66, pad_token_id=1))


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=VOCAB, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    ))


def _bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    ))


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=16,
        patch_size=4, num_labels=3,
    ))


def _whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB, num_mel_bins=8, max_source_positions=8,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None,
    ))


def _unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 64),
        norm_num_groups=8, cross_attention_dim=64, attention_head_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def _sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
    )


def _flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12),
    )


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "Llama", "causal", "CAUSAL_LM", _llama, causal_inputs),
    Family("mistral", "Mistral", "causal", "CAUSAL_LM", _mistral, causal_inputs),
    Family("qwen2", "Qwen2", "causal", "CAUSAL_LM", _qwen2, causal_inputs),
    Family("gemma2", "Gemma 2", "causal", "CAUSAL_LM", _gemma2, causal_inputs),
    Family("phi3", "Phi-3", "causal", "CAUSAL_LM", _phi3, causal_inputs),
    Family("gpt2", "GPT-2", "causal", "CAUSAL_LM", _gpt2, causal_inputs),
    Family("gpt_neox", "GPT-NeoX", "causal", "CAUSAL_LM", _gpt_neox, causal_inputs),
    Family("falcon", "Falcon", "causal", "CAUSAL_LM", _falcon, causal_inputs),
    Family("bert", "BERT (sequence classification)", "classifier", "SEQ_CLS", _bert, classifier_inputs),
    Family("roberta", "RoBERTa (sequence classification)", "classifier", "SEQ_CLS", _roberta, classifier_inputs),
    Family("t5", "T5", "seq2seq", "SEQ_2_SEQ_LM", _t5, seq2seq_inputs),
    Family("bart", "BART", "seq2seq", "SEQ_2_SEQ_LM", _bart, seq2seq_inputs),
    Family("vit", "ViT (image classification)", "image", None, _vit, image_inputs, head=("classifier",)),
    Family("whisper", "Whisper (speech seq2seq)", "speech", "SEQ_2_SEQ_LM", _whisper, speech_inputs),
    Family("unet", "diffusers UNet2DConditionModel", "denoiser", None, _unet, unet_inputs),
    Family("sd3", "diffusers SD3Transformer2DModel", "denoiser", None, _sd3, sd3_inputs),
    Family("flux", "diffusers FluxTransformer2DModel", "denoiser", None, _flux, flux_inputs),
]}


class FamilyCache:
    """Each family's model built once (seeded), saved under ``root`` and loaded back with ``from_pretrained``;
    :meth:`base` hands out deep copies of the loaded model, in eval mode so that no dropout draws."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._loaded: dict[str, nn.Module] = {}

    def base(self, family: Family) -> nn.Module:
        if family.name not in self._loaded:
            directory = self.root / family.name
            torch.manual_seed(SEED)
            model = family.build()
            model.save_pretrained(directory)
            self._loaded[family.name] = type(model).from_pretrained(directory).eval()
        return copy.deepcopy(self._loaded[family.name])
