"""The IA3 plugin's hook implementations (the entry point ``peft_core: ia3``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_core import Method, hookimpl

from peft_ia3.config import IA3Config

if TYPE_CHECKING:
    from torch import nn


PEFT_CORE_API = 1  # the version of peft-core's plugin API this plugin is written for


@hookimpl
def peft_register_methods(register) -> None:
    register(Method(name="ia3", peft_type="IA3", config_class=IA3Config, tensor_prefixes=("ia3_",)))


@hookimpl
def peft_default_targets(register) -> None:
    from peft_ia3.targets import DEFAULT_TARGETS

    for family, (targets, feedforward) in DEFAULT_TARGETS.items():
        register(family, "ia3", targets)
        register(family, "feedforward", feedforward)


@hookimpl
def peft_inject(model: nn.Module, config: object, adapter_name: str) -> list[str] | None:
    if not isinstance(config, IA3Config):
        return None
    from peft_core.inject import inject_adapters

    from peft_ia3.layer import IA3_LAYERS

    # Record the defaults in the config, so the saved adapter says which layers scale their input.
    config.feedforward_modules = config.feedforward_for(model)
    injected = inject_adapters(model, config, adapter_name, IA3_LAYERS)
    if isinstance(config.feedforward_modules, list) and isinstance(config.target_modules, list):
        # inject_adapters kept the default targets that matched; the feed-forward ones stay a subset of them.
        config.feedforward_modules = [m for m in config.feedforward_modules if m in config.target_modules]
    return injected
