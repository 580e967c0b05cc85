"""Injection of layer adapters, shared by every layer method: walk, dispatch by layer type, wrap."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from peft_core.config import LayerConfig
from peft_core.errors import ConfigError
from peft_core.layer import Adapter, AdapterLayer, adapter_placement
from peft_core.modules_to_save import ModulesToSave
from peft_core.tied_embeddings import names_tied_embedding, tied_to_input_embedding
from peft_core.walk import (
    find_target_modules,
    iter_modules,
    matches,
    qualified_names,
    replace_module,
    resolve_target_modules,
)

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
    if getattr(config, "ensure_weight_tying", False):
        _refuse_tied_targets(model, [name for name, *_ in plan])

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
    # The saved config names the defaults it used, as Hugging Face PEFT's does: the file then loads the same
    # way in either library, whatever their default tables say (now or in a later version). Only the names
    # that matched are kept: a family's defaults may list the names of several library versions.
    if config.target_modules is None:
        adapted = [name for name, *_ in plan]
        config.target_modules = [t for t in resolve_target_modules(model, config) if matches_any(adapted, t)]
    for name, module, base, adapter in built:
        if isinstance(module, AdapterLayer):
            module.add(adapter_name, adapter)
        else:
            wrapper = AdapterLayer(base)
            wrapper.train(base.training)
            wrapper.add(adapter_name, adapter)
            replace_module(model, name, wrapper)
    wrapped = wrap_modules_to_save(
        model, config.modules_to_save, adapter_name, tie_weights=getattr(config, "ensure_weight_tying", False)
    )
    return [name for name, *_ in plan] + wrapped


def matches_any(names: list[str], target: str) -> bool:
    return any(matches(name, [target]) for name in names)


def _refuse_tied_targets(model: nn.Module, targets: list[str]) -> None:
    tied = [name for name in tied_to_input_embedding(model) if name in targets]
    if names_tied_embedding(tied):
        raise ConfigError(
            f"ensure_weight_tying=True ties adapters of tied embeddings only through modules_to_save, but {tied} are "
            f"target modules. Train the tied embeddings in full (modules_to_save=['{tied[0].rsplit('.', 1)[-1]}'] "
            f"with ensure_weight_tying=True), or drop ensure_weight_tying so each targeted layer learns its own "
            f"update (merging then unties them)."
        )


def record_transposed_layout(model: nn.Module, config: LayerConfig, adapter_name: str) -> None:
    """Set ``config.fan_in_fan_out`` when the adapter sits on a layer storing its weight transposed (GPT-2's
    ``Conv1D``): Hugging Face PEFT records that in the saved config, so ours says so too."""
    from peft_core.defaults import adapter_layers

    config.fan_in_fan_out = config.fan_in_fan_out or any(
        getattr(layer.adapters[adapter_name], "transposed", False) for _, layer in adapter_layers(model, adapter_name)
    )


def wrap_modules_to_save(
    model: nn.Module, module_names: list[str] | None, adapter_name: str, tie_weights: bool = False
) -> list[str]:
    """Give each module named in ``module_names`` a trainable copy for ``adapter_name``.

    With ``tie_weights`` (``ensure_weight_tying``), naming the input embedding or a module tied to it names them
    all, and their copies share the embedding copy's weight, as in Hugging Face PEFT.
    """
    if not module_names:
        return []
    tied = tied_to_input_embedding(model) if tie_weights else []
    if tie_weights and not (tied and names_tied_embedding(module_names)):
        reason = "modules_to_save names neither embed_tokens nor lm_head" if tied else \
            "no module shares the input embedding's weight"
        warnings.warn(f"ensure_weight_tying=True, but {reason}; nothing is tied.", stacklevel=4)
        tied = []
    chosen = [(name, module) for name, module in iter_modules(model) if name in tied or matches(name, module_names)]
    chosen.sort(key=lambda item: item[0] not in tied[:1])  # the embedding first: the others share its copy's weight
    wrapped, embedding_copy = [], None
    for name, module in chosen:
        if isinstance(module, AdapterLayer):
            raise ConfigError(f"'{name}' is both a target module and in modules_to_save{' (tied)' * (name in tied)}; "
                              f"choose one.")
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            replace_module(model, name, module)
        module.add(adapter_name, weight_from=embedding_copy if name in tied[1:] else None)
        if name in tied[:1]:
            embedding_copy = module.modules_to_save[adapter_name]
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
