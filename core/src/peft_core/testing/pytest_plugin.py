"""The pytest plugin of peft-core (entry point ``pytest11``), active wherever peft-core is installed.

It provides fixtures for method tests (tiny saved models, inputs) and runs the conformance suite of
:mod:`peft_core.testing.conformance` over the models a ``MethodConformance`` subclass lists. Torch and
transformers are imported by the fixtures that need them, so test sessions that do not use them stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
    from torch import nn


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    from peft_core.testing.conformance import MethodConformance

    cls = metafunc.cls
    if cls is not None and issubclass(cls, MethodConformance) and "kind" in metafunc.fixturenames:
        metafunc.parametrize("kind", list(cls.models))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_model_dir(kind)``: the directory where the tiny ``kind`` model is saved, once per session."""
    from peft_core.testing.models import tiny_model

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
    from peft_core.testing.models import tiny_model

    return tiny_model("llama", llama_dir)


@pytest.fixture
def gpt2(tiny_model_dir) -> nn.Module:
    """A fresh tiny GPT-2, whose attention and MLP use transformers' Conv1D."""
    from peft_core.testing.models import tiny_model

    return tiny_model("gpt2", tiny_model_dir("gpt2"))


@pytest.fixture
def input_ids() -> torch.Tensor:
    import torch

    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
