"""``modules_to_save``: a trainable copy of a whole module (a classifier head, say) per adapter."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from peft_core.layer import getattr_through


class ModulesToSave(nn.Module):
    """Holds the original module and one trainable copy per adapter; runs the active adapter's copy.

    Its attribute names (``original_module``, ``modules_to_save``) match Hugging Face PEFT's, so
    parameter names and saved keys are the same.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, name: str, weight_from: nn.Module | None = None) -> None:
        """Add a trainable copy for adapter ``name``; with ``weight_from`` (the copy of a module whose weight the
        original shares, a tied input embedding) the copy shares that copy's weight instead of its own."""
        # The deep copy reuses the given weight where it would copy the original's, so none is allocated.
        memo = {} if weight_from is None else {id(self.original_module.weight): weight_from.weight}
        trained = copy.deepcopy(self.original_module, memo)
        trained.requires_grad_(True)
        self.modules_to_save[name] = trained

    def remove(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, names: list[str]) -> None:
        # One copy can run at a time; the first active adapter that has one wins.
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled

    def forward(self, *args, **kwargs):
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr_through(self, name, "original_module")
