"""Preparing a quantized model for training, as QLoRA users know it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Freeze the base, cast its small half-precision tensors to float32, and set up checkpointing.

    Norms, embeddings and biases in float16/bfloat16 train unstably next to quantized layers, so every
    parameter that is not a quantized weight becomes float32. With gradient checkpointing, the inputs of
    checkpointed blocks must require grad for the adapters inside them to get gradients: the input
    embeddings' output is made to. Returns the model, changed in place.
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ not in ("Params4bit", "Int8Params"):
            param.data = param.data.to(torch.float32)
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
