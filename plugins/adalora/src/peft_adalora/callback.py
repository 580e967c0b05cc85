"""``AdaLoraCallback``: runs the rank allocator in a transformers ``Trainer``."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from peft_adalora.allocator import update_and_allocate


class AdaLoraCallback(TrainerCallback):
    """``Trainer(..., callbacks=[AdaLoraCallback()])``: calls ``update_and_allocate`` after each optimizer step.

    The Trainer calls ``on_optimizer_step`` after ``optimizer.step()`` and before ``zero_grad()``, with the
    step index before it is incremented (0-based), as Hugging Face PEFT's AdaLoRA expects.
    """

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            update_and_allocate(model, state.global_step)
