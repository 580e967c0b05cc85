"""IA3 for peft-core: ``IA3Config`` and its scaling layers."""

from peft_ia3.config import IA3Config

__all__ = ["IA3Config"]
__version__ = "0.1.0"
