"""The QLoRA plugin's hook implementations (the entry point ``peft_core: qlora``).

Quantization is the ``peft_quantize`` hook; injection is LoRA's own (a ``QLoraConfig`` is a
``LoraConfig``, and LoRA's layer table finds bitsandbytes' Linear layers through their base class).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_core import Method, hookimpl

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


def _weight_elements(layer: nn.Module) -> int:
    """A 4-bit weight packs two values into each byte of its uint8 storage; an 8-bit one stores one each."""
    weight = layer.weight
    return weight.numel() * 2 * weight.element_size() if type(weight).__name__ == "Params4bit" else weight.numel()


PEFT_CORE_API = 1  # the version of peft-core's plugin API this plugin is written for


@hookimpl
def peft_register_layer_types(register) -> None:
    # Registered on discovery, so LoRA on a model transformers quantized merges and counts correctly too.
    from peft_core.plugins import LayerType

    for name in QUANTIZED_LINEAR:
        register(LayerType(name, read_weight=_read, write_weight=_write, weight_elements=_weight_elements))


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
