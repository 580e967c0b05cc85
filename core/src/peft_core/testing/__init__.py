"""Tools for testing methods, shared by peft-core's own tests and plugin authors' tests.

The pytest fixtures (``llama``, ``gpt2``, ``input_ids``, ...) are opt-in: a project enables them with
``pytest_plugins = ["peft_core.testing.fixtures"]`` in its top-level ``conftest.py``.
"""

from peft_core.testing.foreign import strip_checksums
from peft_core.testing.models import TINY_MODELS, saved_tiny_model, tiny_model, tiny_tokenizer
from peft_core.testing.training import train_steps

__all__ = ["TINY_MODELS", "saved_tiny_model", "strip_checksums", "tiny_model", "tiny_tokenizer", "train_steps"]
