"""The BitFit plugin's hook implementations (the entry point ``peft_core: bitfit``).

Besides the two hooks every layer method implements, BitFit takes over ``peft_merge`` / ``peft_unmerge``
for its own adapters: merging into a layer that has no bias needs a bias to merge into (see
:mod:`peft_bitfit.layer`). For every other config these hooks return None, so peft-core's defaults run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from peft_core import Method, hookimpl

from peft_bitfit.config import DEFAULT_TARGETS, BitFitConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from peft_core.config import PeftConfig
    from torch import nn


PEFT_CORE_API = 1  # the version of peft-core's plugin API this plugin is written for


@hookimpl
def peft_register_methods(register: Callable[[Method], None]) -> None:
    register(Method(name="bitfit", peft_type="BITFIT", config_class=BitFitConfig, tensor_prefixes=("bitfit_",)))


@hookimpl
def peft_default_targets(register: Callable[[str, str, list[str]], None]) -> None:
    for family, module_names in DEFAULT_TARGETS.items():
        register(family, "bitfit", module_names)


@hookimpl
def peft_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> list[str] | None:
    if not isinstance(config, BitFitConfig):
        return None
    # Imported here, not at the top: plugin discovery must not import torch.
    from peft_core.inject import inject_adapters
    from peft_core.walk import find_target_modules, resolve_target_modules

    from peft_bitfit.layer import BITFIT_LAYERS, check_missing_biases

    # Record the defaults in the config, so the saved adapter names the layers it adapts.
    config.target_modules = resolve_target_modules(model, config)
    if config.missing_bias != "add":  # "add" needs no look at the targets beyond inject_adapters' own
        targets = find_target_modules(model, config)
        kept = check_missing_biases(targets, config)
        if len(kept) < len(targets):  # "skip": inject into exactly the layers that have a bias
            # A copy, so the saved config keeps the targets as the user wrote them.
            config = replace(config, target_modules=[name for name, _ in kept], exclude_modules=None,
                             layers_to_transform=None, layers_pattern=None)
    return inject_adapters(model, config, adapter_name, BITFIT_LAYERS)


@hookimpl
def peft_merge(model: nn.Module, config: PeftConfig, adapter_name: str, safe_merge: bool) -> bool | None:
    if not isinstance(config, BitFitConfig):
        return None
    from peft_bitfit.layer import merge_bitfit

    merge_bitfit(model, adapter_name, safe_merge)
    return True


@hookimpl
def peft_unmerge(model: nn.Module, config: PeftConfig, adapter_name: str) -> bool | None:
    if not isinstance(config, BitFitConfig):
        return None
    from peft_bitfit.layer import unmerge_bitfit

    unmerge_bitfit(model, adapter_name)
    return True
