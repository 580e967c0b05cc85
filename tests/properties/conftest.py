"""Shared by the property tests: base models built once per session and deep-copied per example.

Hypothesis runs a test body many times within one test; loading a model per example would dominate the run
time, so each kind is loaded once (through ``make_base`` of ``tests/conftest.py``) and copied.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session")
def fresh(make_base: Callable[[str], nn.Module]) -> Callable[[str], nn.Module]:
    """``fresh(kind)``: a new, identical, eval-mode copy of the tiny ``kind`` model (llama, gpt2, bert)."""
    built: dict[str, nn.Module] = {}

    def make(kind: str) -> nn.Module:
        if kind not in built:
            built[kind] = make_base(kind)
        return copy.deepcopy(built[kind])

    return make


@pytest.fixture(scope="session")
def outputs(make_inputs: Callable[[str], dict[str, torch.Tensor]]) -> Callable[[nn.Module, str], torch.Tensor]:
    """``outputs(model, kind)``: the model's logits for fixed inputs of that kind, without gradients."""

    def run(model: nn.Module, kind: str) -> torch.Tensor:
        with torch.no_grad():
            return model(**make_inputs(kind)).logits

    return run
