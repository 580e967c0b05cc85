"""Walking a model: which modules a config targets, and putting a new module in a module's place."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from peft_core.errors import ConfigError
from peft_core.patterns import block_index, compile_pattern

if TYPE_CHECKING:
    from torch import nn

    from peft_core.config import LayerConfig

# Qualified class names of the torch and transformers layers that compute like a Linear; plugins add others
# (quantized Linear layers) through peft_register_layer_types. Names avoid importing transformers to test a type.
LINEAR_LIKE = frozenset({"torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D"})


def qualified_names(module: nn.Module) -> Iterator[str]:
    """The qualified names of the module's class and its bases, most derived first."""
    for cls in type(module).__mro__:
        yield f"{cls.__module__}.{cls.__qualname__}"


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``target_modules="all-linear"`` targets a layer of this class."""
    from peft_core.plugins import registry

    names = list(qualified_names(module))
    if any(name in LINEAR_LIKE for name in names):
        return True
    registered = registry().layer_type(names)
    return registered is not None and registered.linear_like


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


def matches(name: str, patterns: list[str] | str, what: str = "target_modules") -> bool:
    """A list matches a name equal to an entry or ending in ``.entry``; a string is a full-match regex,
    matched in bounded time (:mod:`peft_core.patterns`) since it may come from a stranger's config."""
    if isinstance(patterns, str):
        return compile_pattern(patterns, what).fullmatch(name)
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index of the block a module sits in, read as Hugging Face PEFT reads it, or None.

    With ``layers_pattern`` (a name or a regex, or a list of them tried in turn): the number after the first
    ``<pattern>.`` in the name (``encoder.block.3.layer.0.q`` with ``"block"`` -> 3). Without: the first
    number that follows two or more name components (``model.layers.3.mlp`` -> 3, ``transformer.h.3`` -> 3,
    ``backbone.stages.1.blocks.2.fc`` -> 1).
    """
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(found.group(1)) if found else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        index = block_index(pattern, name)  # a user's regex: matched in bounded time; ConfigError if invalid
        if index is not None:
            return index
    return None


def block_indices(model: nn.Module, layers_pattern: list[str] | str | None) -> dict[str, int]:
    """Module name -> index of the block it sits in (see :func:`layer_index`), for the modules inside one.

    Where the default rule numbers no module at all, as when the blocks are the model's first component (a
    bare ``LlamaModel``: ``layers.0.mlp``), the number after the first component is the index.
    """
    names = [name for name, _ in iter_modules(model)]
    found = {name: index for name in names if (index := layer_index(name, layers_pattern)) is not None}
    if not found and not layers_pattern:
        tops = ((name, re.match(r"[^.]+\.(\d+)\.", name)) for name in names)
        found = {name: int(top.group(1)) for name, top in tops if top}
    return found


def _check_layers_to_transform(model: nn.Module, config: LayerConfig, indices: dict[str, int]) -> None:
    """Refuse indices of layers_to_transform that no block of the model has, naming the blocks there are."""
    missing = sorted(set(config.layers_to_transform) - set(indices.values()))
    if not missing:
        return
    pattern = f"layers_pattern={config.layers_pattern!r}" if config.layers_pattern else "the default layers_pattern"
    stacks = sorted({name.rsplit(".", 1)[0].rsplit(".", 1)[-1] for name, _ in iter_modules(model)
                     if name.rsplit(".", 1)[-1].isdigit() and "." in name})
    if indices:
        numbered = sorted(set(indices.values()))
        where = f"its blocks (by {pattern}) are numbered {numbered[0]} to {numbered[-1]}"
    else:
        where = f"{pattern} finds no numbered block in it"
    raise ConfigError(
        f"layers_to_transform {missing} names no block of {type(model).__name__}: {where}. Use indices of existing "
        f"blocks, or set layers_pattern to the module list that holds the blocks (numbered lists here: "
        f"{', '.join(stacks[:12]) or 'none'})."
    )


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if getter is not None else None
    except (NotImplementedError, AttributeError):
        return None


def resolve_target_modules(model: nn.Module, config: LayerConfig) -> list[str] | str:
    """``config.target_modules``, or the default of the config's role for the model's family."""
    if config.target_modules is not None:
        return config.target_modules
    from peft_core.targets import default_targets

    return default_targets(model, config.DEFAULT_TARGETS_ROLE, f"{type(config).__name__}.target_modules")


def linear_like_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's Linear-like layers, in model order."""
    names = (name.rsplit(".", 1)[-1] for name, module in iter_modules(model) if is_linear_like(module))
    return list(dict.fromkeys(names))


def find_target_modules(model: nn.Module, config: LayerConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs the config targets, in model order.

    Raises :class:`ConfigError` naming near matches when nothing matches.
    """
    targets = resolve_target_modules(model, config)
    head = output_head(model) if targets == "all-linear" else None
    indices = block_indices(model, config.layers_pattern) if config.layers_to_transform else {}
    if config.layers_to_transform:
        _check_layers_to_transform(model, config, indices)
    found = []
    for name, module in iter_modules(model):
        if targets == "all-linear":
            from peft_core.layer import AdapterLayer

            base = module.base_layer if isinstance(module, AdapterLayer) else module
            if not is_linear_like(base) or base is head:
                continue
            if config.modules_to_save and matches(name, config.modules_to_save):
                continue  # trained in full instead (a classifier head), as Hugging Face PEFT leaves it
        elif not matches(name, targets, f"{type(config).__name__}.target_modules"):
            continue
        if config.exclude_modules is not None and \
                matches(name, config.exclude_modules, f"{type(config).__name__}.exclude_modules"):
            continue
        if config.layers_to_transform and indices.get(name) not in config.layers_to_transform:
            continue  # an empty list keeps every layer, as in Hugging Face PEFT
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
