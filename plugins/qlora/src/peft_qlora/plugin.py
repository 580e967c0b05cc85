"""The QLoRA plugin's hook implementations (the entry point ``peft_core: qlora``).

Quantization is the ``peft_quantize`` hook; injection is LoRA's own (a ``QLoraConfig`` is a
``LoraConfig``, and LoRA's layer table finds bitsandbytes' Linear layers through their base class).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_core import Method, hookimpl
from peft_core.walk import register_linear_like
from peft_core.weights import register_weight_access

from peft_qlora.config import QLoraConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

QUANTIZED_LINEAR = ("bitsandbytes.nn.modules.Linear4bit", "bitsandbytes.nn.modules.Linear8bitLt")


def _read(layer: nn.Module) -> torch.Tensor:
    from peft_qlora.layer import read_quantized

    return read_quantized(layer)


def _write(layer: nn.Module, weight: torch.Tensor) -> None:
    from peft_qlora.layer import write_quantized

    write_quantized(layer, weight)


# Registered on discovery, so LoRA on a model transformers quantized merges correctly too.
for _name in QUANTIZED_LINEAR:
    register_weight_access(_name, _read, _write)
    register_linear_like(_name)


PEFT_CORE_API = 1  # the version of peft-core's plugin API this plugin is written for


@hookimpl
def peft_register_methods(register) -> None:
    # QLoRA saves plain LoRA adapters: the lora plugin reads them, so this method never loads files.
    register(Method(
        name="qlora", peft_type="LORA", config_class=QLoraConfig, loads_adapters=False, tensor_prefixes=("lora_",)
    ))


@hookimpl
def peft_quantize(model: nn.Module, config: object) -> nn.Module | None:
    if not isinstance(config, QLoraConfig):
        return None
    from peft_qlora.layer import quantize_model

    return quantize_model(model, config)
