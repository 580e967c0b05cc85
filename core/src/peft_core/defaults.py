"""peft-core's own hook implementations: merging and state dicts for every layer method.

Registered before any plugin and marked ``trylast``, so a plugin that implements the same hook for its
config runs first and can take over by returning a result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_core.plugins import hookimpl
from peft_core.walk import iter_modules

if TYPE_CHECKING:  # torch is imported on first use, so that plugin discovery stays light
    import torch
    from torch import nn

    from peft_core.config import PeftConfig
    from peft_core.layer import AdapterLayer

SAVED_PREFIX = "base_model.model."  # the Hugging Face PEFT format's prefix of every saved key


def adapter_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, AdapterLayer]]:
    from peft_core.layer import AdapterLayer

    return [
        (name, module) for name, module in iter_modules(model)
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters
    ]


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Saved key -> live tensor for the adapter's layer adapters and ``modules_to_save`` copies."""
    from peft_core.layer import AdapterLayer
    from peft_core.modules_to_save import ModulesToSave

    tensors = {}
    for name, module in iter_modules(model):
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
            for key, tensor in module.adapters[adapter_name].saved_tensors().items():
                tensors[f"{SAVED_PREFIX}{name}.{key}"] = tensor
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            # Saved under the module's own path, as if it were not wrapped.
            for key, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                tensors[f"{SAVED_PREFIX}{name}.{key}"] = tensor
    return tensors


def trained_bias_tensors(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """Saved key -> base bias for the ``bias`` option of LoRA-like methods (``"all"``, ``"lora_only"``).

    ``"lora_only"``: the biases of the layers this adapter wraps; ``"all"``: every bias but other
    adapters' ``modules_to_save`` copies, under its parameter name without the adapter name.
    """
    tensors = {}
    if bias == "lora_only":
        for name, layer in adapter_layers(model, adapter_name):
            if getattr(layer.base_layer, "bias", None) is not None:
                tensors[f"{SAVED_PREFIX}{name}.base_layer.bias"] = layer.base_layer.bias
    elif bias == "all":
        own_copy = f".modules_to_save.{adapter_name}."
        for name, param in model.named_parameters():
            other_copy = ".modules_to_save." in name and own_copy not in name
            if name.endswith("bias") and ".adapters." not in name and not other_copy:
                tensors[SAVED_PREFIX + name.replace(own_copy, ".modules_to_save.")] = param
    return tensors


@hookimpl(trylast=True)
def peft_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    return adapter_state_dict(model, adapter_name)


@hookimpl(trylast=True)
def peft_merge(model: nn.Module, config: PeftConfig, adapter_name: str, safe_merge: bool) -> bool:
    layers = adapter_layers(model, adapter_name)
    if safe_merge:  # check every layer before changing any, so a failure leaves the model as it was
        for name, layer in layers:
            layer.check_merge(adapter_name, where=name)
    for _, layer in layers:
        layer.merge(adapter_name)
    return True


@hookimpl(trylast=True)
def peft_unmerge(model: nn.Module, adapter_name: str) -> bool:
    for _, layer in adapter_layers(model, adapter_name):
        layer.unmerge(adapter_name)
    return True
