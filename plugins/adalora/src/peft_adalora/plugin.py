"""The AdaLoRA plugin's hook implementations (the entry point ``peft_core: adalora``).

Importing this module stays light: layers, and so torch, load when an adapter is first injected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peft_core import Method, hookimpl

from peft_adalora.config import AdaLoraConfig

if TYPE_CHECKING:
    import torch
    from torch import nn


PEFT_CORE_API = 1  # the version of peft-core's plugin API this plugin is written for


@hookimpl
def peft_register_methods(register) -> None:
    register(Method(
        name="adalora", peft_type="ADALORA", config_class=AdaLoraConfig, tensor_prefixes=("lora_",), adds_loss=True,
    ))


@hookimpl
def peft_inject(model: nn.Module, config: object, adapter_name: str) -> list[str] | None:
    if not isinstance(config, AdaLoraConfig):
        return None
    from peft_core.defaults import adapter_layers
    from peft_core.inject import inject_adapters, record_transposed_layout

    from peft_adalora.allocator import RankAllocator, allocators
    from peft_adalora.layer import ADALORA_LAYERS

    names = inject_adapters(model, config, adapter_name, ADALORA_LAYERS)
    record_transposed_layout(model, config, adapter_name)
    layers = adapter_layers(model, adapter_name)
    allocators(model)[adapter_name] = RankAllocator(config, adapter_name, layers)
    return names


@hookimpl
def peft_state_dict(
    model: nn.Module, config: object, adapter_name: str, for_saving: bool
) -> dict[str, torch.Tensor] | None:
    """The core's mapping and the biases that ``bias`` trains; for saving, pruned triplets left out.

    While training, the allocator only zeroes pruned singular values; the saved file holds the kept
    triplets only (as Hugging Face PEFT does), and a loaded adapter is built at those ranks.
    """
    if not isinstance(config, AdaLoraConfig):
        return None
    import torch
    from peft_core.defaults import SAVED_PREFIX, adapter_layers, adapter_state_dict, trained_bias_tensors

    tensors = adapter_state_dict(model, adapter_name)
    if config.bias != "none":
        tensors.update(trained_bias_tensors(model, adapter_name, wrapped_layers_only=config.bias == "lora_only"))
    if for_saving and config.rank_pattern:
        for name, layer in adapter_layers(model, adapter_name):
            adapter = layer.adapters[adapter_name]
            mask = config.mask_for(name, adapter_name)
            if mask is None or all(mask) or adapter.r != len(mask):
                continue
            keep = torch.tensor(mask, dtype=torch.bool, device=adapter.lora_E.device)
            prefix = f"{SAVED_PREFIX}{name}."
            tensors[prefix + "lora_A"] = adapter.lora_A.detach()[keep]
            tensors[prefix + "lora_E"] = adapter.lora_E.detach()[keep]
            tensors[prefix + "lora_B"] = adapter.lora_B.detach()[:, keep]
    return tensors


@hookimpl
def peft_loss(model: nn.Module, config: object, adapter_name: str) -> torch.Tensor | None:
    """The orthogonality penalty that keeps each adapter's A and B near orthogonal, weighted by orth_reg_weight."""
    if not isinstance(config, AdaLoraConfig):
        return None
    from peft_adalora.allocator import training_penalty

    return training_penalty(model, adapter_name)


@hookimpl
def peft_delete(model: nn.Module, config: object, adapter_name: str) -> None:
    """The adapter's allocator holds its layers: it goes with them."""
    if isinstance(config, AdaLoraConfig):
        from peft_adalora.allocator import forget

        forget(model, adapter_name)


@hookimpl
def peft_optimizer_step(model: nn.Module, config: object, adapter_name: str, step: int) -> None:
    """peft-core's own training loops: allocate ranks after each optimizer step, as install_allocator does."""
    if not isinstance(config, AdaLoraConfig) or config.inference_mode:
        return
    from peft_adalora.allocator import allocators

    allocator = allocators(model).get(adapter_name)
    if allocator is not None and allocator.attached():
        allocator.step(step)


@hookimpl
def peft_describe(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """For ``peft inspect``: the rank budget and the ranks the saved triplets really have (only the kept ones
    are saved, so they show what the allocator left)."""
    if config.get("peft_type") != AdaLoraConfig.PEFT_TYPE:
        return None
    from peft_lora.saved import describe

    return describe(config, tensors, size_fields=("init_r", "target_r", "lora_alpha"), a_suffixes=(".lora_A",))
