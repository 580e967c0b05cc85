"""Config fields checked against their type annotations, so hostile JSON gets a clear error."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import TYPE_CHECKING, Any

from peft_core.errors import ConfigError

if TYPE_CHECKING:
    from peft_core.config import PeftConfig


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each init field; {} for a class whose annotations do not resolve (a
    third-party config naming types it imports only for type checkers), which is then not type-checked."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # whatever evaluating someone's annotations raises
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name in hints}


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` has the type ``annotation`` describes (the forms configs use; others pass)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if annotation is float:  # JSON writes 2.0 as 2, and Python users write lora_alpha=16
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:  # bool is an int subclass, but True is no rank
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, (list, tuple, set, frozenset)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    """``list[int] | int | None`` -> ``a list of int, int or None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is None or annotation is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType, typing.Literal):
        words = [_describe(arg) if origin is not typing.Literal else repr(arg) for arg in args]
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a dict of {_describe(args[0])} to {_describe(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def check_field_types(config: PeftConfig) -> None:
    """Raise :class:`ConfigError` for the first field whose value does not have its annotated type.

    A tuple or set given for a list field becomes a list (a set sorted), so what is saved is what is used.
    """
    for name, annotation in _field_types(type(config)).items():
        value = getattr(config, name)
        if not _matches(value, annotation):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise ConfigError(
                f"{type(config).__name__}.{name} must be {_describe(annotation)}, not {type(value).__name__} "
                f"({shown}). Fix the value passed for {name} (or written in adapter_config.json)."
            )
        if isinstance(value, (tuple, set, frozenset)) and _allows_list(annotation):
            setattr(config, name, sorted(value) if isinstance(value, (set, frozenset)) else list(value))


def _allows_list(annotation: Any) -> bool:
    return any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation)))
