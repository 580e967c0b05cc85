"""A minimal layer method for core tests: a learned per-output scale on Linear layers.

It is defined in test code and registered with ``register_plugin``, which proves the core runs a
method it has never heard of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from peft_core import Method, hookimpl
from peft_core.config import LayerConfig
from peft_core.inject import LayerTable, inject_adapters
from peft_core.layer import Adapter
from torch import nn


@dataclass
class ScaleConfig(LayerConfig):
    PEFT_TYPE: ClassVar[str] = "TEST_SCALE"
    init_value: float = 1.0


class ScaleLinear(Adapter):
    def __init__(self, base: nn.Linear, config: ScaleConfig) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((base.out_features,), config.init_value))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out * self.scale.to(out.dtype)  # float32 scales on a half-precision base keep its dtype

    def merged_weight(self, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale[:, None]

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / self.scale[:, None]


SCALE_LAYERS = LayerTable({
    "torch.nn.modules.linear.Linear": lambda base, config, adapter_name, module_name: ScaleLinear(base, config),
})


@hookimpl
def peft_register_methods(register):
    register(Method(name="scale", peft_type="TEST_SCALE", config_class=ScaleConfig, tensor_prefixes=("scale",)))


@hookimpl
def peft_inject(model, config, adapter_name):
    if isinstance(config, ScaleConfig):
        return inject_adapters(model, config, adapter_name, SCALE_LAYERS)
    return None


@hookimpl
def peft_describe(config, tensors):
    if config.get("peft_type") != ScaleConfig.PEFT_TYPE:
        return None
    # "parameters" is a fact the core states itself: a plugin's field of that name is left out.
    return {"scaled_layers": sum(key.endswith(".scale") for key in tensors), "parameters": -1}
