"""The prompt encoders of P-tuning (Liu et al., 2021, "GPT Understands, Too")."""

from __future__ import annotations

import torch
from peft_core.soft_prompt import SoftPrompt
from torch import nn

from peft_p_tuning.config import PromptEncoderConfig


class LstmEncoder(nn.Module):
    """A bidirectional LSTM over the virtual tokens, then a two-layer head back to the model's width."""

    def __init__(self, width: int, hidden: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            width, hidden, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=True, batch_first=True,
        )
        self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(rows)[0])


def mlp_encoder(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, width),
    )


def build_prompt(config: PromptEncoderConfig) -> SoftPrompt:
    width, hidden = config.token_dim, config.encoder_hidden_size
    embedding = nn.Embedding(config.total_virtual_tokens, width)
    encoder = None
    if not config.inference_mode:  # an adapter built for inference holds the saved final rows
        if config.encoder_reparameterization_type == "LSTM":
            encoder = LstmEncoder(width, hidden, config.encoder_num_layers, config.encoder_dropout)
        else:
            encoder = mlp_encoder(width, hidden)
    return SoftPrompt(config.num_virtual_tokens, embedding, encoder)
