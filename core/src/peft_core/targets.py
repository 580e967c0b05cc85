"""Default target modules by model family: one table of data that every layer method reads.

A config with ``target_modules=None`` adapts the layers its method's *role* (``DEFAULT_TARGETS_ROLE``) names
for the model's family. The core holds only the mechanism; each plugin adds its roles' entries with the
``peft_default_targets`` hook (the LoRA plugin the query and value projections, role ``"attention"``; the
IA3 plugin its own), and third-party plugins add families or roles the same way.

A family is a transformers ``model_type`` (``"llama"``; for a multimodal model, also its text model's,
``"gemma3_text"``) or, for models without one (diffusers), a class name of the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_core.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

def targets_table() -> dict[str, dict[str, list[str]]]:
    """Family -> role -> module names, from every installed plugin's ``peft_default_targets``."""
    from peft_core.plugins import registry

    table: dict[str, dict[str, list[str]]] = {}

    def register(family: str, role: str, module_names: list[str]) -> None:
        if not isinstance(module_names, list) or not all(isinstance(n, str) for n in module_names):
            raise ConfigError(f"peft_default_targets: {family!r} / {role!r} needs a list of module names.")
        table.setdefault(family, {})[role] = list(module_names)

    registry().hook.peft_default_targets(register=register)
    return table


def model_families(model: nn.Module) -> list[str]:
    """The names ``model`` may be listed under, most specific first: its ``model_type``, its text model's
    ``model_type``, then the names of its classes."""
    names = []
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str):
        names.append(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if isinstance(getattr(text, "model_type", None), str):
        names.append(text.model_type)
    names.extend(cls.__name__ for cls in type(model).__mro__)
    return list(dict.fromkeys(names))


def default_targets(model: nn.Module, role: str, owner: str = "target_modules") -> list[str]:
    """The module names ``role`` adapts by default on ``model``'s family.

    Raises :class:`ConfigError` for a family the table does not know, listing the model's Linear-like
    layers to choose ``target_modules`` from.
    """
    table = targets_table()
    for family in model_families(model):
        if role in table.get(family, {}):
            return list(table[family][role])
    from peft_core.walk import linear_like_names

    family = model_families(model)[0]
    raise ConfigError(
        f"{owner} is None and there is no default for a {family!r} model (role {role!r}). Name the layers to adapt: "
        f"its Linear-like layers are {', '.join(linear_like_names(model)) or 'none'} (e.g. target_modules=['q_proj', "
        f"'v_proj']), or use target_modules='all-linear'. A plugin can add defaults for this family with the "
        f"peft_default_targets hook."
    )
