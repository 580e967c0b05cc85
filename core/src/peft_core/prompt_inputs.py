"""Rewriting one model call's inputs for virtual tokens: what every soft-prompt method shares.

A soft prompt adds ``n`` positions before the real tokens, either as input embeddings (prompt tuning,
P-tuning) or as keys and values already in every attention layer's cache (prefix tuning). The rest of the
call must agree: the attention mask gains ``n`` ones in front; explicit position ids move up by ``n``,
so real tokens keep the positions they have after the virtual ones, left padding included; labels of
virtual positions are ignored (-100); token type ids get zeros.

During generation a call either starts (no cache, or an empty one: the virtual tokens must be added) or
continues (the cache holds them already: only the mask and the positions move).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peft_core.errors import PeftError

IGNORE_INDEX = -100  # the label transformers' losses skip
_DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "labels")


def cache_argument(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a key/value cache, or None if it takes none."""
    return _cache_argument_of(type(model))


@functools.cache
def _cache_argument_of(model_class: type) -> str | None:
    parameters = inspect.signature(model_class.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def is_continuation(model: nn.Module, inputs: dict[str, Any]) -> bool:
    """Whether the call continues from a cache that already holds the virtual tokens."""
    if inputs.get("use_cache") is False:
        return False  # a cache here is one a prefix put in an earlier call; without caching, calls start anew
    cache = inputs.get(cache_argument(model) or "past_key_values", inputs.get("past_key_values"))
    return cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0


def prepend_embeddings(
    model: nn.Module, inputs: dict[str, Any], prompt: Callable[[], torch.Tensor], num_virtual_tokens: int,
    continuation: bool,
) -> dict[str, Any]:
    """Put the ``(num_virtual_tokens, hidden)`` rows that ``prompt()`` returns before the input embeddings.

    ``prompt`` is called only when the rows are needed, not on calls that continue from a cache.

    For an encoder-decoder model the prompt goes before the encoder's inputs; decoder calls during
    generation carry the encoder's outputs, which have seen it already.
    """
    inputs = dict(inputs)
    if is_encoder_decoder(model):
        if inputs.get("encoder_outputs") is None:
            n = prepend_to_embeddings(model, inputs, prompt())
            prepend_filled(inputs, "attention_mask", n, 1)
        return inputs
    if continuation:
        n = num_virtual_tokens
        prepend_filled(inputs, "attention_mask", n, 1)
        _shift_positions(inputs, "position_ids", n, add_virtual=False)
        return inputs
    n = prepend_to_embeddings(model, inputs, prompt())
    prepend_filled(inputs, "attention_mask", n, 1)
    prepend_filled(inputs, "token_type_ids", n, 0)
    if isinstance(inputs.get("labels"), torch.Tensor) and inputs["labels"].dim() == 2:
        prepend_filled(inputs, "labels", n, IGNORE_INDEX)  # per-token labels; a classifier's are per sequence
    _shift_positions(inputs, "position_ids", n, add_virtual=True)
    return inputs


def prepend_cache(
    model: nn.Module, inputs: dict[str, Any], key_values: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]],
    num_virtual_tokens: int, continuation: bool,
) -> dict[str, Any]:
    """Put ``num_virtual_tokens`` cached positions before the inputs of every attention layer.

    ``key_values(batch_size)`` returns one ``(key, value)`` pair per layer, each shaped ``(batch,
    heads, n, head_dim)``. For an encoder-decoder model they go to the decoder's self-attention.
    """
    key = cache_argument(model)
    if key is None:
        raise PeftError(f"{type(model).__name__}.forward takes no key/value cache, so prefixes cannot reach it.")
    inputs = dict(inputs)
    if key != "past_key_values" and "past_key_values" in inputs:
        inputs[key] = inputs.pop("past_key_values")  # the older name of the same argument
    decoder = is_encoder_decoder(model)
    if decoder and not any(inputs.get(name) is not None for name in _DECODER_INPUTS):
        return inputs  # an encoder-only call (generate's entry): the prefix joins the decoder's calls
    n = num_virtual_tokens
    if not continuation:
        batch = _batch_size(inputs, decoder)
        inputs[key] = filled_cache(model, inputs.get(key), key_values(batch))
    prepend_filled(inputs, "decoder_attention_mask" if decoder else "attention_mask", n, 1)
    _shift_positions(inputs, "decoder_position_ids" if decoder else "position_ids", n, add_virtual=False)
    return inputs


def real_positions(inputs: dict[str, Any], batch: int, device: torch.device) -> torch.Tensor:
    """The real tokens' position ids: as given, else counted over the attention mask (so left padding
    does not count), else ``0..n-1``."""
    if inputs.get("position_ids") is not None:
        return inputs["position_ids"].expand(batch, -1)
    mask = inputs.get("attention_mask")
    if mask is not None:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -sequence_length(inputs):]
    return torch.arange(sequence_length(inputs), device=device).expand(batch, -1)


def sequence_length(inputs: dict[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds"):
        if inputs.get(name) is not None:
            return inputs[name].shape[1]
    raise PeftError("A soft prompt needs input_ids or inputs_embeds to put its virtual tokens before.")


def prepend_to_embeddings(model: nn.Module, inputs: dict[str, Any], prompt: torch.Tensor) -> int:
    """Put ``prompt`` rows, ``(n, hidden)`` for all samples or ``(batch, n, hidden)``, before the inputs."""
    embeds = inputs.pop("inputs_embeds", None)
    input_ids = inputs.pop("input_ids", None)
    if embeds is None:
        if input_ids is None:
            raise PeftError("A soft prompt needs input_ids or inputs_embeds to put its virtual tokens before.")
        embeds = model.get_input_embeddings()(input_ids)
    prompt = prompt.to(embeds.dtype)
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1)
    inputs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
    return prompt.shape[1]


def prepend_filled(inputs: dict[str, Any], key: str, n: int, fill: int) -> None:
    tensor = inputs.get(key)
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise PeftError(
            f"Soft prompts extend {key} by their virtual tokens and need it as a 2-D (batch, sequence) tensor; "
            f"got {shape}. Pass the 2-D {key} and let the model build its own 4-D mask."
        )
    inputs[key] = torch.cat([tensor.new_full((tensor.shape[0], n), fill), tensor], dim=1)


def _shift_positions(inputs: dict[str, Any], key: str, n: int, add_virtual: bool) -> None:
    positions = inputs.get(key)
    if positions is None:
        return  # the model counts positions from the cache length, which includes the virtual tokens
    shifted = positions + n
    if add_virtual:
        virtual = torch.arange(n, device=positions.device, dtype=positions.dtype)
        shifted = torch.cat([virtual.expand(*positions.shape[:-1], n), shifted], dim=-1)
    inputs[key] = shifted


def _batch_size(inputs: dict[str, Any], decoder: bool) -> int:
    names = ("decoder_input_ids", "decoder_inputs_embeds", "labels") if decoder else ("input_ids", "inputs_embeds")
    for name in names:
        if inputs.get(name) is not None:
            return inputs[name].shape[0]
    raise PeftError(f"Cannot tell the batch size: the call has none of {', '.join(names)}.")


def filled_cache(model: nn.Module, cache: Any, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """``cache`` (or a new one) holding the prefix; a cache that generation made is filled in place."""
    from transformers import DynamicCache, EncoderDecoderCache

    if cache is None or cache.get_seq_length() > 0:  # none, or a stale one from an uncached earlier call
        cache = _new_dynamic_cache(model)
        if is_encoder_decoder(model):
            cache = EncoderDecoderCache(cache, _new_dynamic_cache(model))
    target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    if not isinstance(target, DynamicCache):
        raise PeftError(
            f"Prefix tuning fills a DynamicCache with its prefixes; this call brought a {type(target).__name__}. "
            f"Generate with the default cache (no cache_implementation)."
        )
    for layer, (key, value) in enumerate(key_values):
        target.update(key, value, layer)
    return cache


def _new_dynamic_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)  # knows sliding-window layers (transformers >= 4.56)
    except TypeError:
        return DynamicCache()
