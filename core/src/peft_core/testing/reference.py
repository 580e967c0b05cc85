"""The conformance kit's own reference method, so that a plugin's conformance run needs nothing but peft-core.

``ReferenceConfig`` adds to each target Linear-like layer's output a learned low-rank term, ``x D^T U^T``:
enough of a method for the method under test to be stacked with, saved, loaded and merged exactly. It is a
test fixture, as pytest ships its own; it is registered only when a test asks for it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peft_core.config import LayerConfig
from peft_core.inject import LayerTable, inject_adapters
from peft_core.layer import Adapter
from peft_core.plugins import Method, hookimpl, registry

PEFT_CORE_API = 1
PLUGIN_NAME = "peft-core-reference-method"


@dataclass
class ReferenceConfig(LayerConfig):
    """The reference method's config: ``target_modules`` and the ``rank`` of the added term."""

    PEFT_TYPE: ClassVar[str] = "PEFT_CORE_REFERENCE"
    rank: int = 2


class ReferenceAdapter(Adapter):
    """``out + x D^T U^T``, with random (not zero) factors, so that the adapter changes what the layer computes."""

    def __init__(self, in_features: int, out_features: int, rank: int, transposed: bool) -> None:
        super().__init__()
        self.ref_down = nn.Parameter(0.1 * torch.randn(rank, in_features))  # (r, in)
        self.ref_up = nn.Parameter(0.1 * torch.randn(out_features, rank))  # (out, r)
        self.transposed = transposed  # GPT-2's Conv1D stores its weight as (in, out)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        dtype = self.ref_down.dtype  # float32 on a half-precision base (adapter_placement)
        return out + ((x.to(dtype) @ self.ref_down.t()) @ self.ref_up.t()).to(out.dtype)

    def _delta(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.ref_up @ self.ref_down  # (out, in)
        return (delta.t() if self.transposed else delta).to(weight.dtype)

    def merged_weight(self, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        return weight + self._delta(weight)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self._delta(weight)


def _linear(base: nn.Module, config: ReferenceConfig, adapter_name: str, module_name: str) -> ReferenceAdapter:
    return ReferenceAdapter(base.in_features, base.out_features, config.rank, transposed=False)


def _conv1d(base: nn.Module, config: ReferenceConfig, adapter_name: str, module_name: str) -> ReferenceAdapter:
    in_features, out_features = base.weight.shape
    return ReferenceAdapter(in_features, out_features, config.rank, transposed=True)


REFERENCE_LAYERS = LayerTable({
    "torch.nn.modules.linear.Linear": _linear, "transformers.pytorch_utils.Conv1D": _conv1d,
})


@hookimpl
def peft_register_methods(register) -> None:
    register(Method(name="reference", peft_type=ReferenceConfig.PEFT_TYPE, config_class=ReferenceConfig,
                    tensor_prefixes=("ref_",)))


@hookimpl
def peft_inject(model: nn.Module, config: object, adapter_name: str) -> list[str] | None:
    if not isinstance(config, ReferenceConfig):
        return None
    return inject_adapters(model, config, adapter_name, REFERENCE_LAYERS)


def register_reference_method() -> None:
    """Register the reference method with the plugin registry, unless it is there (again after a reset)."""
    if not registry().manager.has_plugin(PLUGIN_NAME):
        registry().register(sys.modules[__name__], name=PLUGIN_NAME)
