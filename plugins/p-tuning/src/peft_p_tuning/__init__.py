"""P-tuning for peft-core: ``PromptEncoderConfig``."""

from peft_p_tuning.config import PromptEncoderConfig

__all__ = ["PromptEncoderConfig"]
__version__ = "0.1.0"
