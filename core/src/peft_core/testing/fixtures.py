"""pytest fixtures for method tests: tiny saved models and inputs. Enable with
``pytest_plugins = ["peft_core.testing.fixtures"]`` in a conftest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from peft_core.testing.models import tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_model_dir(kind)``: the directory where the tiny ``kind`` model is saved, once per session."""
    directories: dict[str, Path] = {}

    def directory(kind: str) -> Path:
        if kind not in directories:
            directories[kind] = tmp_path_factory.mktemp(kind)
            tiny_model(kind, directories[kind])
        return directories[kind]

    return directory


@pytest.fixture
def llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture
def llama(llama_dir) -> nn.Module:
    """A fresh tiny Llama (hidden 64, 2 layers, vocabulary 128), loaded with from_pretrained."""
    return tiny_model("llama", llama_dir)


@pytest.fixture
def gpt2(tiny_model_dir) -> nn.Module:
    """A fresh tiny GPT-2, whose attention and MLP use transformers' Conv1D."""
    return tiny_model("gpt2", tiny_model_dir("gpt2"))


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
