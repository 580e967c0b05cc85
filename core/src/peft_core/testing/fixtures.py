"""pytest fixtures for method tests: tiny saved models and a batch of token ids.

They are opt-in, as pytest's own ``pytester`` is, so that installing peft-core puts no fixture names
(``llama``, ``input_ids``, ...) into other projects' test suites. Enable them in the top-level
``conftest.py`` of a project (or in the test modules that use them)::

    pytest_plugins = ["peft_core.testing.fixtures"]

Torch and transformers are imported by the fixtures that need them, so test sessions that do not use them
stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
    from torch import nn


@pytest.fixture(scope="session")
def tiny_model_dir() -> Callable[[str], Path]:
    """``tiny_model_dir(kind)``: the folder holding the tiny ``kind`` model, saved once per process."""
    from peft_core.testing.models import saved_tiny_model

    return saved_tiny_model


@pytest.fixture
def llama_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture
def llama(llama_dir: Path) -> nn.Module:
    """A fresh tiny Llama (hidden 64, 2 layers, vocabulary 128), loaded with from_pretrained."""
    from peft_core.testing.models import tiny_model

    return tiny_model("llama", llama_dir)


@pytest.fixture
def gpt2(tiny_model_dir: Callable[[str], Path]) -> nn.Module:
    """A fresh tiny GPT-2, whose attention and MLP use transformers' Conv1D."""
    from peft_core.testing.models import tiny_model

    return tiny_model("gpt2", tiny_model_dir("gpt2"))


@pytest.fixture
def input_ids() -> torch.Tensor:
    """Token ids ``(2, 12)`` below the tiny models' vocabulary size, the same in every test."""
    import torch

    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
