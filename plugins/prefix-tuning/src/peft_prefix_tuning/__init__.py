"""Prefix tuning for peft-core: ``PrefixTuningConfig``."""

from peft_prefix_tuning.config import PrefixTuningConfig

__all__ = ["PrefixTuningConfig"]
__version__ = "0.1.0"
