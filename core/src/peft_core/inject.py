"""Injection of layer adapters, shared by every layer method: walk, dispatch by layer type, wrap."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from peft_core.config import LayerConfig
from peft_core.errors import ConfigError
from peft_core.layer import Adapter, AdapterLayer, adapter_placement
from peft_core.modules_to_save import ModulesToSave
from peft_core.walk import find_target_modules, iter_modules, matches, qualified_names, replace_module

# Builds one adapter: (base layer, config, adapter name, module name) -> Adapter.
AdapterFactory = Callable[[nn.Module, LayerConfig, str, str], Adapter]


class LayerTable:
    """A method's adapter factories keyed by the qualified class name of the base layer.

    Lookup walks the base layer's class hierarchy, so subclasses (a quantized Linear) match their
    base class's entry unless they have one of their own. Plugins extend a table with ``register``.
    """

    def __init__(self, entries: dict[str, AdapterFactory] | None = None) -> None:
        self._entries: dict[str, AdapterFactory] = dict(entries or {})

    def register(self, qualified_name: str, factory: AdapterFactory) -> None:
        self._entries[qualified_name] = factory

    def lookup(self, layer: nn.Module) -> AdapterFactory | None:
        for name in qualified_names(layer):
            if name in self._entries:
                return self._entries[name]
        return None

    def supported(self) -> list[str]:
        return sorted(name.rsplit(".", 1)[-1] for name in self._entries)


def inject_adapters(model: nn.Module, config: LayerConfig, adapter_name: str, table: LayerTable) -> list[str]:
    """Wrap every layer ``config`` targets and add one adapter built by ``table`` to it.

    Returns the names of the adapted modules. Raises :class:`ConfigError` before changing anything
    if a target is a layer type the method cannot adapt, or if its factory refuses a layer.
    """
    plan = []
    for name, module in find_target_modules(model, config):
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        factory = table.lookup(base)
        if factory is None:
            raise ConfigError(
                f"{type(config).__name__} cannot adapt '{name}', a {type(base).__name__}; it adapts "
                f"{', '.join(table.supported())}. Narrow target_modules or add it to exclude_modules."
            )
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
            raise ConfigError(f"'{name}' already has an adapter named {adapter_name!r}; pick another name.")
        plan.append((name, module, base, factory))

    # Every adapter is built before any is attached: a factory that refuses a layer (or runs out of
    # memory) leaves the model as it was.
    built = []
    for name, module, base, factory in plan:
        device, dtype = adapter_placement(base)
        with torch.device(device):  # on 'meta' this allocates and initialises nothing
            adapter = factory(base, config, adapter_name, name)
        adapter.to(dtype=dtype)
        adapter.train(base.training)  # new modules start in training mode; follow the model's
        built.append((name, module, base, adapter))
    for name, module, base, adapter in built:
        if isinstance(module, AdapterLayer):
            module.add(adapter_name, adapter)
        else:
            wrapper = AdapterLayer(base)
            wrapper.train(base.training)
            wrapper.add(adapter_name, adapter)
            replace_module(model, name, wrapper)
    wrapped = wrap_modules_to_save(model, config.modules_to_save, adapter_name)
    return [name for name, *_ in plan] + wrapped


def record_transposed_layout(model: nn.Module, config: LayerConfig, adapter_name: str) -> None:
    """Set ``config.fan_in_fan_out`` when the adapter sits on a layer storing its weight transposed (GPT-2's
    ``Conv1D``): Hugging Face PEFT records that in the saved config, so ours says so too."""
    from peft_core.defaults import adapter_layers

    config.fan_in_fan_out = config.fan_in_fan_out or any(
        getattr(layer.adapters[adapter_name], "transposed", False) for _, layer in adapter_layers(model, adapter_name)
    )


def wrap_modules_to_save(model: nn.Module, module_names: list[str] | None, adapter_name: str) -> list[str]:
    """Give each module named in ``module_names`` a trainable copy for ``adapter_name``."""
    if not module_names:
        return []
    wrapped = []
    for name, module in list(iter_modules(model)):
        if not matches(name, module_names):
            continue
        if isinstance(module, AdapterLayer):
            raise ConfigError(f"'{name}' is both a target module and in modules_to_save; choose one.")
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            replace_module(model, name, module)
        module.add(adapter_name)
        wrapped.append(name)
    return wrapped


def check_rank(config: LayerConfig, rank: int, module_name: str, in_features: int, out_features: int) -> None:
    """Refuse a rank beyond both sides of the layer, before anything is allocated.

    A rank-``r`` update of an ``out x in`` weight has rank at most ``min(in, out)``; a rank beyond
    ``max(in, out)`` only wastes memory, and a hostile config (``r: 10**9``) would exhaust it.
    """
    limit = max(in_features, out_features)
    if rank > limit:
        raise ConfigError(
            f"{type(config).__name__}: rank {rank} for '{module_name}' ({in_features} -> {out_features}) exceeds "
            f"the layer's larger side ({limit}); a rank above min(in, out) = {min(in_features, out_features)} adds "
            f"nothing. Lower r (or its rank_pattern entry)."
        )
