"""Soft prompts: trained virtual tokens put before a model's inputs or into its attention caches.

Prompt tuning, P-tuning and prefix tuning differ in how their rows are produced (a table, or a table fed
through a reparameterising encoder while training) and where they go (the input embeddings, or every
attention layer's keys and values). :class:`SoftPrompt` holds both choices, so the three plugins only
build one; the rewriting of a call's inputs is in :mod:`peft_core.prompt_inputs`.

Soft prompts live on the base model under ``peft_soft_prompts.<adapter name>``, so they move with it
(``.to``, ``.train``) and show up in its parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peft_core.errors import ConfigError, PeftError
from peft_core.prompt_inputs import (
    IGNORE_INDEX,
    cache_argument,
    filled_cache,
    is_encoder_decoder,
    prepend_cache,
    prepend_embeddings,
    prepend_filled,
    prepend_to_embeddings,
    real_positions,
    sequence_length,
)

if TYPE_CHECKING:
    from peft_core.config import PromptLearningConfig

ATTRIBUTE = "peft_soft_prompts"
SAVED_KEY = "prompt_embeddings"  # the Hugging Face PEFT format's one key for every soft prompt
ENCODER_KEY_PREFIX = "prompt_encoder."  # trained but never saved: the saved rows are its output


@dataclass(frozen=True)
class PrefixLayout:
    """How a prefix table's rows become per-layer keys and values.

    Each row holds, for every layer block, the key then the value of all ``num_heads`` heads.
    ``sources[i]`` is the block that attention layer ``i`` reads.
    """

    num_heads: int
    head_dim: int
    sources: tuple[int, ...]

    def key_values(self, rows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)``, each ``(batch, heads, n, head_dim)``, from ``(n, width)`` rows."""
        return self.batched_key_values(rows.unsqueeze(0).expand(batch_size, *rows.shape))

    def batched_key_values(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same from ``(batch, n, width)`` rows: a prefix per sample."""
        batch, n = rows.shape[:2]
        blocks = rows.reshape(batch, n, -1, 2, self.num_heads, self.head_dim).permute(2, 3, 0, 4, 1, 5)
        return [(blocks[s, 0], blocks[s, 1]) for s in self.sources]


class SoftPrompt(nn.Module):
    """One soft-prompt adapter's virtual tokens.

    ``embedding`` has a row per virtual token (two blocks of ``num_virtual_tokens`` for an
    encoder-decoder model, as the saved format has). Without an ``encoder`` those rows are the tokens;
    with one (``(1, n, d_in) -> (1, n, d_out)``) the tokens are its output, and only that output is saved.
    ``prefix`` is None for tokens placed before the input embeddings, or the layout of a key/value prefix.
    """

    def __init__(
        self, num_virtual_tokens: int, embedding: nn.Embedding, encoder: nn.Module | None = None,
        prefix: PrefixLayout | None = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = embedding
        self.encoder = encoder
        self.prefix = prefix

    def forward(self) -> torch.Tensor:
        """The virtual tokens' rows, ``(total rows, width)``."""
        rows = self.embedding.weight
        return rows if self.encoder is None else self.encoder(rows.unsqueeze(0))[0]

    def rewrite(self, model: nn.Module, inputs: dict[str, Any], continuation: bool) -> dict[str, Any]:
        """The inputs of one model call with this prompt's virtual tokens added."""
        dtype = model.get_input_embeddings().weight.dtype
        if self.prefix is None:
            return prepend_embeddings(
                model, inputs, lambda: self()[: self.num_virtual_tokens], self.num_virtual_tokens, continuation
            )
        prefix = self.prefix
        return prepend_cache(
            model, inputs, lambda batch: prefix.key_values(self().to(dtype), batch), self.num_virtual_tokens,
            continuation,
        )

    def saved_tensors(self, for_saving: bool) -> dict[str, torch.Tensor]:
        """Saved key -> tensor: the rows, computed by the encoder if there is one.

        The live mapping (``for_saving=False``) of an encoder prompt names the encoder's parameters,
        which train but are not saved.
        """
        if for_saving:
            return {SAVED_KEY: self().detach()}
        if self.encoder is None:
            return {SAVED_KEY: self.embedding.weight}
        return {ENCODER_KEY_PREFIX + name: param for name, param in self.named_parameters()}


def rewrite_mixed(
    model: nn.Module, inputs: dict[str, Any], prompts: Sequence[SoftPrompt | None], index: torch.Tensor,
    continuation: bool,
) -> dict[str, Any]:
    """The inputs of one call of a decoder-only model where sample ``b`` gets ``prompts[index[b]]``
    (``None``, or an index past the end: no virtual tokens).

    Every sample gets room for the longest prefix and the longest prompt; each fills the end of that room
    with its own tokens and masks the rest, and its positions count only its own tokens, so each sample
    computes what it would alone.
    """
    if is_encoder_decoder(model):
        raise PeftError(
            "Mixed batches with soft prompts are supported on decoder-only models; for this encoder-decoder "
            "model run the soft-prompt adapters one at a time (methods that adapt layers mix on any model)."
        )
    inputs = dict(inputs)
    slots = [*prompts, None]
    embedded = [p if p is not None and p.prefix is None else None for p in slots]
    prefixed = [p if p is not None and p.prefix is not None else None for p in slots]
    room_prefix = max((p.num_virtual_tokens for p in prefixed if p is not None), default=0)
    room_prompt = max((p.num_virtual_tokens for p in embedded if p is not None), default=0)
    own_prefix, own_prompt = _lengths(prefixed, index), _lengths(embedded, index)
    batch, key = index.shape[0], cache_argument(model)
    mask = inputs.get("attention_mask")
    if mask is None:  # all real tokens count, those already in the cache included
        cached = inputs[key].get_seq_length() - room_prefix - room_prompt if continuation else 0
        mask = torch.ones(batch, cached + sequence_length(inputs), dtype=torch.long, device=index.device)
    positions = real_positions({**inputs, "attention_mask": mask}, batch, index.device)
    positions = positions + (own_prefix + own_prompt)[:, None]
    if not continuation and room_prompt:
        rows = _left_padded([p and p()[: p.num_virtual_tokens] for p in embedded], room_prompt)[index]
        prepend_to_embeddings(model, inputs, rows)
        prepend_filled(inputs, "token_type_ids", room_prompt, 0)
        if isinstance(inputs.get("labels"), torch.Tensor) and inputs["labels"].dim() == 2:
            prepend_filled(inputs, "labels", room_prompt, IGNORE_INDEX)
        virtual = torch.arange(room_prompt, device=index.device) - (room_prompt - own_prompt)[:, None]
        positions = torch.cat([virtual.clamp(min=0), positions], dim=1)
    if not continuation and room_prefix:
        layer_rows = _left_padded([p and _prefix_rows(model, p) for p in prefixed], room_prefix)[index]
        layout = next(p.prefix for p in prefixed if p is not None)
        inputs[key] = filled_cache(model, inputs.get(key), layout.batched_key_values(layer_rows))
    virtual_mask = torch.cat([_own_columns(room_prefix, own_prefix), _own_columns(room_prompt, own_prompt)], dim=1)
    inputs["attention_mask"] = torch.cat([virtual_mask.to(mask.dtype), mask], dim=1)
    inputs["position_ids"] = positions
    return inputs


def _lengths(prompts: Sequence[SoftPrompt | None], index: torch.Tensor) -> torch.Tensor:
    lengths = torch.tensor([p.num_virtual_tokens if p is not None else 0 for p in prompts], device=index.device)
    return lengths[index]


def _own_columns(room: int, own: torch.Tensor) -> torch.Tensor:
    """(batch, room): 1 in the last ``own[b]`` columns of row ``b``."""
    return (torch.arange(room, device=own.device) >= (room - own)[:, None]).long()


def _left_padded(rows: Sequence[torch.Tensor | None], room: int) -> torch.Tensor:
    """The slots' rows stacked, ``(slots, room, ...)``, each at the end of zeros; zeros for ``None``."""
    reference = next(r for r in rows if r is not None)
    stacked = reference.new_zeros(len(rows), room, *reference.shape[1:])
    for slot, slot_rows in enumerate(rows):
        if slot_rows is not None:
            stacked[slot, room - slot_rows.shape[0]:] = slot_rows
    return stacked


def _prefix_rows(model: nn.Module, prompt: SoftPrompt) -> torch.Tensor:
    return prompt().to(model.get_input_embeddings().weight.dtype)


def decoder_only_sources(num_layers: int) -> tuple[int, ...]:
    return tuple(range(num_layers))


def encoder_decoder_sources(num_layers: int) -> tuple[int, ...]:
    """Blocks read by the decoder's self-attention layers of an encoder-decoder model.

    Hugging Face PEFT 0.21 duplicates the table's blocks and hands decoder layer ``i`` the block
    ``2i mod num_layers``; keeping that layout keeps saved prefixes interchangeable.
    """
    return tuple((2 * i) % num_layers for i in range(num_layers))


def inject_soft_prompt(
    model: nn.Module, config: PromptLearningConfig, adapter_name: str, prompt: SoftPrompt
) -> list[str]:
    """What a soft-prompt plugin's ``peft_inject`` does once it has built ``prompt``: put it on the model,
    on the device of the input embeddings, and wrap the config's ``modules_to_save``.

    Returns the names of the added or wrapped modules.
    """
    from peft_core.inject import wrap_modules_to_save

    if soft_prompt(model, adapter_name) is not None:
        raise ConfigError(f"This model has a soft prompt named {adapter_name!r} already; pick another name.")
    prompts = getattr(model, ATTRIBUTE, None)
    if prompts is None:
        prompts = nn.ModuleDict()
        model.add_module(ATTRIBUTE, prompts)
    prompt.to(model.get_input_embeddings().weight.device)
    prompt.train(model.training)
    prompts[adapter_name] = prompt
    return [f"{ATTRIBUTE}.{adapter_name}", *wrap_modules_to_save(model, config.modules_to_save, adapter_name)]


def soft_prompt(model: nn.Module, adapter_name: str) -> SoftPrompt | None:
    prompts = getattr(model, ATTRIBUTE, None)
    return prompts[adapter_name] if prompts is not None and adapter_name in prompts else None


def detach_soft_prompts(model: nn.Module, adapter_names: Sequence[str] | None = None) -> None:
    """Remove these adapters' prompts (default: all), and the container once it is empty."""
    prompts = getattr(model, ATTRIBUTE, None)
    if prompts is None:
        return
    for name in list(prompts) if adapter_names is None else adapter_names:
        if name in prompts:
            del prompts[name]
    if not len(prompts):
        delattr(model, ATTRIBUTE)
