"""The few numbers soft-prompt methods need from a transformers config, under whatever name it uses."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from peft_core.errors import ConfigError

# Each field's names across model families, most common first.
_NAMES = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer", "num_decoder_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int  # fewer than num_attention_heads with grouped-query attention
    head_dim: int
    is_encoder_decoder: bool


def model_shape(model: Any) -> ModelShape:
    """Read the shape of ``model`` (or of the text model of a multimodal one) from its config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(
            f"{type(model).__name__} has no transformers config to read its shape from; set token_dim, "
            f"num_layers and num_attention_heads in the adapter config."
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def read(field: str) -> int:
        for name in _NAMES[field]:
            value = getattr(text, name, None)
            if isinstance(value, int):
                return value
        raise ConfigError(
            f"Cannot tell {field} of {type(model).__name__} from its config (looked for "
            f"{', '.join(_NAMES[field])}); set it in the adapter config."
        )

    hidden, heads = read("hidden_size"), read("num_attention_heads")
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_kv_heads", None) or heads
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon's original layout: one key/value head shared by all, whatever num_kv_heads says
    return ModelShape(
        num_layers=read("num_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim,
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
    )


def check_token_inputs(model: Any, owner: str) -> None:
    """Refuse a model that takes no token ids: soft prompts add virtual tokens to a model's token inputs."""
    from torch import nn

    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    forward = getattr(model, "forward", None)
    takes_ids = forward is not None and "input_ids" in inspect.signature(forward).parameters
    if not isinstance(embeddings, nn.Embedding) or not takes_ids:
        raise ConfigError(
            f"{owner} adds virtual tokens to a model's token inputs, but {type(model).__name__} takes no token ids "
            f"(input_ids). Use a method that adapts layers for this model."
        )


def max_positions(model: Any) -> int | None:
    """How many positions ``model`` takes, where its config says (absolute position embeddings, a RoPE
    model's trained context); None for models without a stated limit (T5's relative positions)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
