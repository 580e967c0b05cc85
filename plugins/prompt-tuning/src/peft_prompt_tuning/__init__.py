"""Prompt tuning for peft-core: ``PromptTuningConfig``."""

from peft_prompt_tuning.config import PromptTuningConfig

__all__ = ["PromptTuningConfig"]
__version__ = "0.1.0"
