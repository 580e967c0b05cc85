"""transformers' ``Trainer`` with peft-core models: checkpoints that hold only the adapters.

``Trainer`` saves and reloads whole models unless it recognises Hugging Face PEFT's own classes, so it
would write every base weight into each checkpoint. :class:`PeftTrainerMixin` replaces its three model
file methods (save, resume, load the best checkpoint) by the adapter format; mix it into any ``Trainer``
subclass (TRL's ``SFTTrainer`` too) or use :class:`PeftTrainer`::

    trainer = PeftTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=...)

A checkpoint then holds ``adapter_config.json`` and ``adapter_model.safetensors`` (others in subfolders, a
stack manifest if several adapters are active), loadable with ``PeftModel.from_pretrained``. Methods that
train something other than what they save (P-tuning's prompt encoder, a prefix projection) also write
``adapter_training_state.safetensors`` with their live tensors, so ``resume_from_checkpoint`` continues the
same run.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import Trainer

TRAINING_STATE_NAME = "adapter_training_state.safetensors"


class PeftTrainerMixin:
    """Overrides ``Trainer``'s model saving and loading for a :class:`~peft_core.model.PeftModel`, and
    has it read the wrapped model's signature (its label names, whether it returns a loss)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from transformers.utils import can_return_loss, find_labels

        wrapped = type(self._peft_model().get_base_model())
        if self.args.label_names is None:
            self.label_names = find_labels(wrapped)
        self.can_return_loss = can_return_loss(wrapped)

    def _peft_model(self) -> Any:
        from peft_core.errors import PeftError
        from peft_core.model import PeftModel

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            raise PeftError(
                f"{type(self).__name__} trains a peft_core PeftModel, not a {type(model).__name__}: wrap the model "
                "with peft_core.get_peft_model(model, config) first."
            )
        return model

    def _set_signature_columns_if_needed(self) -> None:
        # The wrapper's forward takes **kwargs; the columns to keep are those the wrapped model takes.
        if self._signature_columns is None:
            import inspect

            forward = self._peft_model().get_base_model().forward
            self._signature_columns = [*inspect.signature(forward).parameters, "label", "label_ids", *self.label_names]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self._peft_model()
        model.save_pretrained(output_dir)
        _save_training_state(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        import torch

        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        _load_checkpoint(self._peft_model(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        _load_checkpoint(self._peft_model(), self.state.best_model_checkpoint)


class PeftTrainer(PeftTrainerMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints hold only the model's adapters."""


def _save_training_state(model: Any, directory: str) -> None:
    from safetensors.torch import save_file

    live = {}
    for name in model.peft_config:
        saved, trained = model._adapter_tensors(name, for_saving=True), model._adapter_tensors(name)
        if saved.keys() != trained.keys():
            live.update({f"{name}/{key}": tensor.detach().cpu().contiguous() for key, tensor in trained.items()})
    if live:
        save_file(live, os.path.join(directory, TRAINING_STATE_NAME))


def _load_checkpoint(model: Any, directory: str) -> None:
    """Copy a checkpoint's tensors into the model's existing adapters, live training state first."""
    from safetensors.torch import load_file

    state_file = os.path.join(directory, TRAINING_STATE_NAME)
    state = load_file(state_file) if os.path.isfile(state_file) else {}
    for name in model.peft_config:
        prefix = f"{name}/"
        own = {key.removeprefix(prefix): t for key, t in state.items() if key.startswith(prefix)}
        if own:
            from peft_core.serialization import copy_into

            copy_into(model._adapter_tensors(name), own, state_file)
        else:
            model.load_adapter_weights(directory, name)
