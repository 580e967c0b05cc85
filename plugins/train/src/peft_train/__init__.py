"""peft-train: the ``peft train`` command and transformers' ``Trainer`` for peft-core models.

Importing this package is cheap (plugin discovery imports it to find the command): the trainers and the
callback load transformers, and TRL, on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PeftTrainer": "peft_train.trainer",
    "PeftTrainerMixin": "peft_train.trainer",
    "PeftSFTTrainer": "peft_train.trl",
    "MethodSteps": "peft_train.method_steps",
}

__all__ = [*_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peft_train' has no attribute {name!r}")
