"""A few training steps, the way every method's tests train."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def train_steps(
    model: nn.Module, input_ids: torch.Tensor, steps: int, lr: float = 1e-2,
    on_optimizer: Callable[[torch.optim.Optimizer], object] | None = None,
) -> list[float]:
    """Train the trainable parameters with AdamW on a language-modelling loss; return the losses.

    ``on_optimizer`` sees the optimizer before the first step (AdaLoRA installs its allocator there).
    The model is left in eval mode.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if on_optimizer is not None:
        on_optimizer(optimizer)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses
