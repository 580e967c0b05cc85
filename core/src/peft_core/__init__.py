"""peft-core: parameter-efficient fine-tuning with methods as plugins.

Importing this package is cheap: torch-heavy modules load on first use of the names that need them.
"""

from __future__ import annotations

import importlib
from typing import Any

from peft_core.errors import AdapterLoadError, ConfigError, PeftError, PluginError
from peft_core.plugins import Method, broken_plugins, hookimpl, methods, register_plugin, reset_registry

__version__ = "0.1.0"

_LAZY = {
    "PeftConfig": "peft_core.config",
    "LayerConfig": "peft_core.config",
    "PromptLearningConfig": "peft_core.config",
    "PeftModel": "peft_core.model",
    "PeftModelForCausalLM": "peft_core.model",
    "PeftModelForSeq2SeqLM": "peft_core.model",
    "PeftModelForSequenceClassification": "peft_core.model",
    "PeftModelForTokenClassification": "peft_core.model",
    "PeftModelForQuestionAnswering": "peft_core.model",
    "PeftModelForFeatureExtraction": "peft_core.model",
    "get_peft_model": "peft_core.model",
    "stack": "peft_core.stacking",
    "Stack": "peft_core.stacking",
    "Adapter": "peft_core.layer",
    "AdapterLayer": "peft_core.layer",
    "ModulesToSave": "peft_core.modules_to_save",
    "SoftPrompt": "peft_core.soft_prompt",
    "LayerTable": "peft_core.inject",
    "inject_adapters": "peft_core.inject",
    "find_target_modules": "peft_core.walk",
    "ServingModel": "peft_core.serving",
    "ReadWriteLock": "peft_core.serving",
}

__all__ = [
    "AdapterLoadError", "ConfigError", "Method", "PeftError", "PluginError", "broken_plugins", "hookimpl",
    "methods", "register_plugin", "reset_registry", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peft_core' has no attribute {name!r}")
