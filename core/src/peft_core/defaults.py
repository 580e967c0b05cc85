"""peft-core's own hook implementations: merging and state dicts for every layer method, and the
forward, state dict and (refused) merge of every soft prompt.

Registered before any plugin and marked ``trylast``, so a plugin that implements the same hook for its
config runs first and can take over by returning a result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peft_core.errors import PeftError
from peft_core.plugins import hookimpl
from peft_core.walk import iter_modules, plain_name

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
                tensors[f"{SAVED_PREFIX}{plain_name(name)}.{key}"] = tensor
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            # Saved under the module's own path, as if it were not wrapped.
            for key, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                tensors[f"{SAVED_PREFIX}{plain_name(name)}.{key}"] = tensor
    return tensors


def trained_bias_tensors(model: nn.Module, adapter_name: str, wrapped_layers_only: bool) -> dict[str, torch.Tensor]:
    """Saved key -> base bias, for methods that train the base model's biases beside their adapter.

    ``wrapped_layers_only``: the biases of the layers this adapter wraps, under ``<layer>.base_layer.bias``;
    otherwise every bias but adapters' own and other adapters' ``modules_to_save`` copies, under its parameter
    name without the adapter name (both as Hugging Face PEFT saves them).
    """
    tensors = {}
    if wrapped_layers_only:
        for name, layer in adapter_layers(model, adapter_name):
            if getattr(layer.base_layer, "bias", None) is not None:
                tensors[f"{SAVED_PREFIX}{name}.base_layer.bias"] = layer.base_layer.bias
    else:
        own_copy = f".modules_to_save.{adapter_name}."
        own_layers = {name for name, _ in adapter_layers(model, adapter_name)}
        for name, param in model.named_parameters():
            other_copy = ".modules_to_save." in name and own_copy not in name
            if name.endswith("bias") and ".adapters." not in name and not other_copy:
                layer, _, rest = name.partition(".base_layer.")
                if rest and layer not in own_layers:  # wrapped for another adapter: saved as if it were not
                    name = f"{layer}.{rest}"
                tensors[SAVED_PREFIX + name.replace(own_copy, ".modules_to_save.")] = param
    return tensors


def prompt_state_dict(model: nn.Module, adapter_name: str, for_saving: bool) -> dict[str, torch.Tensor] | None:
    """Saved key -> tensor for a soft-prompt adapter, or None if ``adapter_name`` is not one.

    Hugging Face PEFT saves a soft prompt's ``modules_to_save`` one level higher than a layer
    method's (``base_model.classifier.weight``): its prompt methods do not wrap the model.
    """
    from peft_core.soft_prompt import soft_prompt

    prompt = soft_prompt(model, adapter_name)
    if prompt is None:
        return None
    tensors = prompt.saved_tensors(for_saving)
    for key, tensor in adapter_state_dict(model, adapter_name).items():
        tensors["base_model." + key.removeprefix(SAVED_PREFIX)] = tensor
    return tensors


@hookimpl(trylast=True)
def peft_state_dict(model: nn.Module, adapter_name: str, for_saving: bool) -> dict[str, torch.Tensor]:
    prompt_tensors = prompt_state_dict(model, adapter_name, for_saving)
    return prompt_tensors if prompt_tensors is not None else adapter_state_dict(model, adapter_name)


@hookimpl(trylast=True)
def peft_forward(
    model: nn.Module, adapter_name: str, inputs: dict[str, Any], continuation: bool
) -> dict[str, Any] | None:
    from peft_core.soft_prompt import soft_prompt

    prompt = soft_prompt(model, adapter_name)
    return None if prompt is None else prompt.rewrite(model, inputs, continuation)


@hookimpl(trylast=True)
def peft_merge(model: nn.Module, config: PeftConfig, adapter_name: str, safe_merge: bool) -> bool:
    from peft_core.soft_prompt import soft_prompt

    if soft_prompt(model, adapter_name) is not None:
        raise PeftError(
            f"Adapter {adapter_name!r} is a soft prompt ({config.peft_type}): its virtual tokens are inputs, "
            f"not weights, so it cannot be merged into the base model. Keep the PeftModel for inference, or "
            f"merge only the other adapters (merge_and_unload(adapter_names=[...]))."
        )
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
