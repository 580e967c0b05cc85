"""The core's ``peft_optimizer_step`` hook, called from transformers' Trainer: methods whose training needs
more than the optimizer (AdaLoRA's rank allocator) act after each optimizer step.

``peft train`` adds :class:`MethodSteps` to its trainer; add it to your own ``PeftTrainer`` with
``callbacks=[peft_train.MethodSteps(model)]`` to get the same (for AdaLoRA, that or its own API, not both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:
    from peft_core.model import PeftModel


class MethodSteps(TrainerCallback):
    """After each ``optimizer.step()``, before the gradients are zeroed (AdaLoRA reads them), call
    ``peft_optimizer_step`` once per active adapter with the 0-based index of the step."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model  # the PeftModel; the Trainer's own may be wrapped for distribution

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        from peft_core.plugins import registry

        # global_step counts finished steps, and moves on only after this event: it is this step's index.
        for name in self.model.active_adapters:
            registry().hook.peft_optimizer_step(
                model=self.model.get_base_model(), config=self.model.peft_config[name], adapter_name=name,
                step=state.global_step,
            )
