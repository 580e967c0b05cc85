"""Tiny base models for the cross-library tests, built from configs with fixed seeds.

Each transformers model is built once per session and saved with ``save_pretrained``; every test gets
fresh copies through ``from_pretrained``, because both libraries change the model they wrap in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from peft_core.testing.models import TinyConvNet
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SEED = 0
VOCAB = 128

# The models are tiny: one thread is fastest, and several threads spin against each other on a busy
# 2-core machine (a 64x128 matmul took 30 ms with 2 threads, 15 us with 1).
torch.set_num_threads(1)


class TinyEmbeddingNet(nn.Module):
    """A custom model whose input layer is an ``nn.Embedding`` (with a padding index)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 4)
        return self.head(torch.tanh(self.proj(self.emb(input_ids))))


CUSTOM_MODELS: dict[str, type[nn.Module]] = {"conv": TinyConvNet, "embnet": TinyEmbeddingNet}
# Our model kinds -> peft_core.testing's tiny transformers models (Llama, GPT-2 with Conv1D, BERT classifier).
TRANSFORMERS_MODELS = {"llama": "llama", "gpt2": "gpt2", "bert": "bert-classifier"}


@pytest.fixture(scope="session")
def make_base(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], nn.Module]:
    """``make_base(kind)``: a fresh, identical, eval-mode float32 base model of that kind.

    Transformers models are built with a fixed seed and saved once per session, then loaded back with
    ``from_pretrained`` for every call.
    """
    from peft_core.testing import tiny_model

    root = tmp_path_factory.mktemp("base_models")

    def make(kind: str) -> nn.Module:
        if kind in CUSTOM_MODELS:
            torch.manual_seed(SEED)
            return CUSTOM_MODELS[kind]().eval()
        name = TRANSFORMERS_MODELS[kind]
        return tiny_model(name, root / name, seed=SEED, dtype=torch.float32)

    return make


@pytest.fixture(scope="session")
def make_inputs() -> Callable[[str], dict[str, torch.Tensor]]:
    """``make_inputs(kind)``: fixed keyword inputs for a model of that kind."""

    def make(kind: str) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(SEED)
        if kind == "conv":
            return {"x": torch.randn(2, 3, 8, 8, generator=generator)}
        input_ids = torch.randint(1, VOCAB, (2, 7), generator=generator)
        input_ids[0, 0] = 0  # the padding index of TinyEmbeddingNet's embedding
        if kind == "embnet":
            return {"input_ids": input_ids}
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    return make
