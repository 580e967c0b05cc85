"""``PrefixTuningConfig``: the fields and meanings Hugging Face PEFT users know."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peft_core.config import PeftConfig, PromptLearningConfig
from peft_core.errors import ConfigError


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: ``num_virtual_tokens`` trained key/value positions before every attention layer's
    own, given to the model as a pre-filled cache.

    With ``prefix_projection`` the prefixes are produced while training by a two-layer MLP (hidden width
    ``encoder_hidden_size``, tanh) from a smaller table; saving stores its output. ``token_dim`` and
    ``num_attention_heads`` are the width and head count of the keys and values: with grouped-query
    attention, the key/value heads.
    """

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"
    IGNORED_FIELDS: ClassVar[dict[str, Any]] = {**PeftConfig.IGNORED_FIELDS, "init_weights": None}

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def validate(self) -> None:
        super().validate()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(f"encoder_hidden_size must be positive, not {self.encoder_hidden_size!r}.")

    def model_token_dim(self, shape: Any) -> int:
        # Keys and values have only the key/value heads; the prefix must have that shape.
        grouped = shape.num_key_value_heads != shape.num_attention_heads
        return shape.num_key_value_heads * shape.head_dim if grouped else shape.hidden_size

    def complete_from(self, model: Any) -> None:
        from peft_core.model_shape import model_shape

        shape = model_shape(model)
        if shape.num_key_value_heads != shape.num_attention_heads:
            self.num_attention_heads = self.num_attention_heads or shape.num_key_value_heads
        super().complete_from(model)
        if self.token_dim % self.num_attention_heads:
            raise ConfigError(
                f"token_dim={self.token_dim} does not split into num_attention_heads={self.num_attention_heads} "
                f"heads; set both to the key/value width and head count of the model's attention."
            )
        if self.num_attention_heads != shape.num_key_value_heads:  # the cache would not fit the attention
            raise ConfigError(
                f"PrefixTuningConfig.num_attention_heads is {self.num_attention_heads}, but {type(model).__name__} "
                f"has {shape.num_key_value_heads} key/value heads: the adapter was made for a model of another "
                f"shape. Load it into the base model it was trained on."
            )
        self.encoder_hidden_size = self.encoder_hidden_size or self.token_dim

    def parameter_count(self) -> int:
        width = self.num_layers * 2 * self.token_dim  # a row holds every layer's key and value
        count = self.total_virtual_tokens * width
        if self.prefix_projection:
            hidden = self.encoder_hidden_size or self.token_dim
            count += self.total_virtual_tokens * self.token_dim + self.token_dim * hidden + hidden * width
        return count
