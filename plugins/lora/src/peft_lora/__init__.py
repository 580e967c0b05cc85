"""LoRA for peft-core: ``LoraConfig`` and its layers (DoRA, rsLoRA, PiSSA initialisation included)."""

from peft_lora.config import LoraConfig

__all__ = ["LoraConfig"]
__version__ = "0.1.0"
