"""AdaLoRA for peft-core: ``AdaLoraConfig``, its SVD-form layers and the rank allocator.

Importing this package stays light (no torch): the allocator functions and the Trainer callback load on
first access.
"""

from __future__ import annotations

from typing import Any

from peft_adalora.config import AdaLoraConfig

__all__ = ["AdaLoraCallback", "AdaLoraConfig", "install_allocator", "update_and_allocate"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("update_and_allocate", "install_allocator"):
        from peft_adalora import allocator

        return getattr(allocator, name)
    if name == "AdaLoraCallback":
        from peft_adalora.callback import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module 'peft_adalora' has no attribute {name!r}")
