"""The LoRA plugin's hook implementations (the entry point ``peft_core: lora``).

Importing this module stays light: layers, and so torch, load when an adapter is first injected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peft_core import Method, hookimpl

from peft_lora.config import LoraConfig

if TYPE_CHECKING:
    import torch
    from torch import nn


PEFT_CORE_API = 1  # the version of peft-core's plugin API this plugin is written for


@hookimpl
def peft_register_methods(register) -> None:
    register(Method(name="lora", peft_type="LORA", config_class=LoraConfig, tensor_prefixes=("lora_",)))


@hookimpl
def peft_register_formats(register) -> None:
    """``peft convert --to diffusers`` / ``--from diffusers`` (the module imports neither torch nor diffusers)."""
    from peft_lora.diffusers_format import FORMAT

    register(FORMAT)


@hookimpl
def peft_default_targets(register) -> None:
    from peft_lora.targets import DEFAULT_TARGETS

    for family, module_names in DEFAULT_TARGETS.items():
        register(family, "attention", module_names)


@hookimpl
def peft_inject(model: nn.Module, config: object, adapter_name: str) -> list[str] | None:
    if not isinstance(config, LoraConfig):
        return None
    from peft_core.inject import inject_adapters, record_transposed_layout

    from peft_lora.layer import LORA_LAYERS

    names = inject_adapters(model, config, adapter_name, LORA_LAYERS)
    record_transposed_layout(model, config, adapter_name)
    return names


@hookimpl
def peft_state_dict(model: nn.Module, config: object, adapter_name: str) -> dict[str, torch.Tensor] | None:
    """The core's mapping plus the base biases that ``bias`` trains (saved under their own names)."""
    if not isinstance(config, LoraConfig) or config.bias == "none":
        return None
    from peft_core.defaults import adapter_state_dict, trained_bias_tensors

    biases = trained_bias_tensors(model, adapter_name, wrapped_layers_only=config.bias == "lora_only")
    return {**adapter_state_dict(model, adapter_name), **biases}


@hookimpl
def peft_add_weighted_adapter(
    peft_model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str,
    options: dict[str, Any],
) -> bool | None:
    """LoRA's ``add_weighted_adapter`` (QLoRA's too: a ``QLoraConfig`` is a ``LoraConfig``)."""
    if not all(isinstance(peft_model.peft_config[name], LoraConfig) for name in adapters):
        return None
    from peft_lora.weighted import add_weighted_adapter

    add_weighted_adapter(peft_model, adapters, weights, adapter_name, combination_type, options)
    return True


@hookimpl
def peft_describe(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """For ``peft inspect``: the config's rank and alpha fields and the ranks the factors really have."""
    if config.get("peft_type") != LoraConfig.PEFT_TYPE:
        return None
    from peft_lora.saved import describe

    return describe(config, tensors)
