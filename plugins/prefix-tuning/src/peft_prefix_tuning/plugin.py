"""The prefix-tuning plugin's hook implementations (the entry point ``peft_core: prefix_tuning``).

peft-core's defaults run the forward, state dict and merge refusal of every soft prompt, so the plugin
only registers its method, checks that the model can take a prefix, and builds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_core import ConfigError, Method, hookimpl

from peft_prefix_tuning.config import PrefixTuningConfig

if TYPE_CHECKING:
    from torch import nn


PEFT_CORE_API = 1  # the version of peft-core's plugin API this plugin is written for


@hookimpl
def peft_register_methods(register) -> None:
    register(Method(
        name="prefix-tuning", peft_type="PREFIX_TUNING", config_class=PrefixTuningConfig,
        transforms_inputs=True, merges=False, tensor_prefixes=(),
    ))


@hookimpl
def peft_inject(model: nn.Module, config: object, adapter_name: str) -> list[str] | None:
    if not isinstance(config, PrefixTuningConfig):
        return None
    from peft_core.prompt_inputs import cache_argument, is_encoder_decoder
    from peft_core.soft_prompt import inject_soft_prompt
    from peft_core.walk import is_checkpointing

    from peft_prefix_tuning.prompt import build_prompt

    if cache_argument(model) is None:
        raise ConfigError(
            f"Prefix tuning cannot reach the attention of {type(model).__name__}: its forward takes no "
            f"key/value cache (a 'cache' or 'past_key_values' argument), which is how prefixes are given to "
            f"the attention layers. Use prompt tuning or P-tuning (PromptTuningConfig, PromptEncoderConfig) "
            f"for this model."
        )
    if is_checkpointing(model):
        raise ConfigError(
            "Prefix tuning does not work with gradient checkpointing: recomputing a layer would add its "
            "prefix to the cache twice. Turn activation (gradient) checkpointing off for this model."
        )
    config.complete_from(model)
    return inject_soft_prompt(model, config, adapter_name, build_prompt(config, is_encoder_decoder(model)))
