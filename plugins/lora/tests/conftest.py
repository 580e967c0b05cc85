from __future__ import annotations

import pytest
import torch
from peft_core.testing import tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    dirs = {}
    for kind in ("llama", "gpt2"):
        dirs[kind] = tmp_path_factory.mktemp(kind)
        tiny_model(kind, dirs[kind])
    return dirs


@pytest.fixture
def llama(model_dirs):
    return tiny_model("llama", model_dirs["llama"])


@pytest.fixture
def gpt2(model_dirs):
    return tiny_model("gpt2", model_dirs["gpt2"])


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
