"""BitFit for peft-core: ``BitFitConfig`` and its bias adapters."""

from peft_bitfit.config import BitFitConfig

__all__ = ["BitFitConfig"]
__version__ = "0.1.0"
