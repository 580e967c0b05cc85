"""A few training steps, the way every method's tests train."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn


def train_steps(
    model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor], steps: int, lr: float = 1e-2,
    on_optimizer: Callable[[torch.optim.Optimizer], object] | None = None,
) -> list[float]:
    """Train the trainable parameters with AdamW; return the losses.

    ``inputs`` is a batch of token ids (a language-modelling loss on them) or the keyword inputs of a
    call that returns a loss (with its ``labels``).

    ``on_optimizer`` sees the optimizer before the first step (AdaLoRA installs its allocator there).
    The model is left in eval mode.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if on_optimizer is not None:
        on_optimizer(optimizer)
    model.train()
    losses = []
    for _ in range(steps):
        batch = {"input_ids": inputs, "labels": inputs} if isinstance(inputs, torch.Tensor) else inputs
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses
