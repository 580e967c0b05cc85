"""Tools for testing methods, shared by peft-core's own tests and plugin authors' tests."""

from peft_core.testing.foreign import strip_checksums
from peft_core.testing.models import TINY_MODELS, tiny_model, tiny_tokenizer
from peft_core.testing.training import train_steps

__all__ = ["TINY_MODELS", "strip_checksums", "tiny_model", "tiny_tokenizer", "train_steps"]
