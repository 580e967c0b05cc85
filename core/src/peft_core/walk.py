"""Walking a model: which modules a config targets, and putting a new module in a module's place."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from peft_core.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from peft_core.config import LayerConfig

# Names of the module stacks holding a model's blocks, tried when layers_pattern is not given.
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")

# Qualified class names of layers that compute like a Linear. Plugins add theirs (e.g. quantized
# Linear layers) with register_linear_like; names avoid importing transformers to test a type.
_LINEAR_LIKE = {"torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D"}


def qualified_names(module: nn.Module) -> Iterator[str]:
    """The qualified names of the module's class and its bases, most derived first."""
    for cls in type(module).__mro__:
        yield f"{cls.__module__}.{cls.__qualname__}"


def register_linear_like(qualified_name: str) -> None:
    """Declare a layer class that ``"all-linear"`` should target."""
    _LINEAR_LIKE.add(qualified_name)


def is_linear_like(module: nn.Module) -> bool:
    return any(name in _LINEAR_LIKE for name in qualified_names(module))


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Like ``named_modules`` but treats peft wrappers as leaves, so adapters are never targets."""
    from peft_core.layer import AdapterLayer
    from peft_core.modules_to_save import ModulesToSave

    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, (AdapterLayer, ModulesToSave)):
            yield from iter_modules(child, full)


# Modules that wrappers (FSDP, activation checkpointing, torch.compile) insert into a model's paths. Saved
# names leave them out, as the model's own state_dict does, so a file saved from a wrapped model loads into
# a plain one.
WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def plain_name(name: str) -> str:
    """``name`` without the components that wrappers insert."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def matches(name: str, patterns: list[str] | str) -> bool:
    """A list matches a name equal to an entry or ending in ``.entry``; a string is a full-match regex."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index of the block a module sits in (``model.layers.3.mlp`` -> 3), or None."""
    patterns = DEFAULT_LAYERS_PATTERNS if layers_pattern is None else layers_pattern
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for pattern in patterns:
        found = re.match(rf"(?:.*\.)?{re.escape(pattern)}\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if getter is not None else None
    except (NotImplementedError, AttributeError):
        return None


def resolve_target_modules(model: nn.Module, config: LayerConfig) -> list[str] | str:
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = config.DEFAULT_TARGET_MODULES.get(model_type or "")
    if defaults is None:
        raise ConfigError(
            f"{type(config).__name__}.target_modules is None and there is no default for model type "
            f"{model_type!r}. Name the layers to adapt, e.g. target_modules=['q_proj', 'v_proj'], "
            f"or use target_modules='all-linear'."
        )
    return defaults


def find_target_modules(model: nn.Module, config: LayerConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs the config targets, in model order.

    Raises :class:`ConfigError` naming near matches when nothing matches.
    """
    targets = resolve_target_modules(model, config)
    head = output_head(model) if targets == "all-linear" else None
    found = []
    for name, module in iter_modules(model):
        if targets == "all-linear":
            from peft_core.layer import AdapterLayer

            base = module.base_layer if isinstance(module, AdapterLayer) else module
            if not is_linear_like(base) or base is head:
                continue
            if config.modules_to_save and matches(name, config.modules_to_save):
                continue  # trained in full instead (a classifier head), as Hugging Face PEFT leaves it
        elif not matches(name, targets):
            continue
        if config.exclude_modules is not None and matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            index = layer_index(name, config.layers_pattern)
            if index is None or index not in config.layers_to_transform:
                continue
        found.append((name, module))
    if not found:
        raise ConfigError(_no_match_message(model, config, targets))
    return found


def _no_match_message(model: nn.Module, config: LayerConfig, targets: list[str] | str) -> str:
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name, _ in iter_modules(model)})
    wanted = [targets] if isinstance(targets, str) else targets
    near = sorted({m for w in wanted for m in difflib.get_close_matches(w.rsplit(".", 1)[-1], leaf_names, n=3)})
    message = f"target_modules {targets!r} matched no module of {type(model).__name__}"
    if config.exclude_modules or config.layers_to_transform is not None:
        message += " (after exclude_modules / layers_to_transform)"
    message += ". "
    if near:
        message += f"Near matches: {', '.join(near)}. "
    return message + f"Module names in this model end with: {', '.join(leaf_names[:40])}."


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent of the module at ``name`` and the attribute under which it holds it."""
    parent_name, _, child_name = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child_name


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the module ``name`` is."""
    parent, child_name = get_parent(model, name)
    setattr(parent, child_name, new)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether gradient checkpointing is on for ``model`` (a transformers model)."""
    # transformers 5 renamed the flag; reading the old name there only warns.
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), flag):
            return bool(getattr(model, flag))
    return False
