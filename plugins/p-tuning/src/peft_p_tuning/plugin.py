"""The P-tuning plugin's hook implementations (the entry point ``peft_core: p_tuning``).

peft-core's defaults run the forward, state dict and merge refusal of every soft prompt, so the plugin
only registers its method and builds its prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peft_core import Method, hookimpl

from peft_p_tuning.config import PromptEncoderConfig

if TYPE_CHECKING:
    from torch import nn


PEFT_CORE_API = 1  # the version of peft-core's plugin API this plugin is written for


@hookimpl
def peft_register_methods(register) -> None:
    register(Method(
        name="p-tuning", peft_type="P_TUNING", config_class=PromptEncoderConfig, transforms_inputs=True,
        merges=False, tensor_prefixes=(),
    ))


@hookimpl
def peft_inject(model: nn.Module, config: object, adapter_name: str) -> list[str] | None:
    if not isinstance(config, PromptEncoderConfig):
        return None
    from peft_core.soft_prompt import inject_soft_prompt

    from peft_p_tuning.prompt import build_prompt

    config.complete_from(model)
    return inject_soft_prompt(model, config, adapter_name, build_prompt(config))


@hookimpl
def peft_describe(config: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any] | None:
    """For ``peft inspect``: the width of the prompt encoder that trained the saved rows."""
    if config.get("peft_type") != PromptEncoderConfig.PEFT_TYPE:
        return None
    return {"encoder_hidden_size": config.get("encoder_hidden_size")}
