from __future__ import annotations

import pytest
import torch
from peft_core.testing import tiny_model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", directory)
    return directory


@pytest.fixture
def llama(llama_dir):
    return tiny_model("llama", llama_dir)


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
