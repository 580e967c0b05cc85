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

from peft_core.errors import ConfigError
from peft_core.prompt_inputs import prepend_cache, prepend_embeddings

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
        n = rows.shape[0]
        blocks = rows.view(n, -1, 2, self.num_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        shape = (batch_size, self.num_heads, n, self.head_dim)
        return [(blocks[s, 0].expand(shape), blocks[s, 1].expand(shape)) for s in self.sources]


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
