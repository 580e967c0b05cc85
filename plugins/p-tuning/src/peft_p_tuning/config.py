"""``PromptEncoderConfig``: the fields and meanings Hugging Face PEFT users know."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from peft_core.config import PromptLearningConfig
from peft_core.errors import ConfigError

ENCODERS = ("MLP", "LSTM")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: ``num_virtual_tokens`` embeddings put before the input embeddings, produced while training
    by a prompt encoder from a table of the same shape.

    ``encoder_reparameterization_type`` is ``"MLP"`` (two hidden layers of ``encoder_hidden_size`` with
    ReLU; ``encoder_num_layers`` does not apply) or ``"LSTM"`` (a bidirectional LSTM of
    ``encoder_num_layers`` layers and ``encoder_dropout``, then a two-layer head). ``encoder_hidden_size``
    defaults to the model's hidden size. Saving stores the encoder's output, not the encoder.
    """

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in ENCODERS:
            raise ConfigError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r} is not one of "
                f"{', '.join(ENCODERS)}."
            )
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(f"encoder_hidden_size must be positive, not {self.encoder_hidden_size!r}.")
        if self.encoder_num_layers < 1:
            raise ConfigError(f"encoder_num_layers must be at least 1, not {self.encoder_num_layers!r}.")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), not {self.encoder_dropout!r}.")
        if self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != 2:
            warnings.warn(
                "encoder_num_layers only applies to the LSTM encoder; the MLP encoder always has two hidden "
                "layers.", stacklevel=3,
            )

    def complete_from(self, model: Any) -> None:
        super().complete_from(model)
        self.encoder_hidden_size = self.encoder_hidden_size or self.token_dim

    def parameter_count(self) -> int:
        width, hidden = self.token_dim, self.encoder_hidden_size or self.token_dim
        if self.encoder_reparameterization_type == "LSTM":  # two directions of four gates, then the head
            encoder = 8 * (width + hidden) * hidden * self.encoder_num_layers + 4 * hidden * hidden + 2 * hidden * width
        else:
            encoder = 2 * width * hidden + hidden * hidden
        return super().parameter_count() + encoder
