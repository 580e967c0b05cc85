"""``stack([...])``: several adapters, of any methods, applied together in a defined order.

A stack is either new adapters (configs) for ``get_peft_model`` or names of adapters a model has, for
``set_adapter``. Applied together, adapters act in stack order: on a layer, input adapters map the input
in that order, then the base layer runs, then output adapters map the output in that order (LoRA then
IA3 on one Linear computes ``l * (W x + b + s B A x)``); soft prompts place their virtual tokens in that
order, each in front of what the previous one produced.

Saved, a stack is one directory: each member a normal adapter in its own subfolder (so it loads alone,
in this library or in Hugging Face PEFT) and ``peft_stack.json`` listing the members in order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peft_core.errors import AdapterLoadError, PeftError

if TYPE_CHECKING:
    from peft_core.config import PeftConfig

MANIFEST_NAME = "peft_stack.json"
# Adapter names become folder names and module keys: no separators, dots or other surprises.
_VALID_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Stack:
    """Members in order: configs of new adapters, or names of existing ones (not both)."""

    members: tuple[PeftConfig | str, ...]
    names: tuple[str, ...]

    @property
    def of_configs(self) -> bool:
        return not isinstance(self.members[0], str)

    @property
    def task_type(self) -> str | None:
        """The first member's task type, which picks the ``PeftModel`` class for the stack."""
        return next((m.task_type for m in self.members if getattr(m, "task_type", None)), None)


def stack(members: Sequence[PeftConfig | str], names: Sequence[str] | None = None) -> Stack:
    """Compose adapters: ``stack([LoraConfig(...), PrefixTuningConfig(...)])`` for ``get_peft_model``, or
    ``stack(["task", "language"])`` for ``set_adapter``.

    New adapters are named by ``names``, else after their method (``lora``, ``ia3``, ``prefix-tuning``;
    a repeated method gets ``lora-2``, ...).
    """
    members = tuple(members)
    if not members:
        raise PeftError("stack() needs at least one member.")
    if len({isinstance(m, str) for m in members}) > 1:
        raise PeftError("stack() takes configs of new adapters or names of existing ones, not a mix of both.")
    if isinstance(members[0], str):
        chosen = members
    elif names is not None:
        chosen = tuple(names)
        if len(chosen) != len(members):
            raise PeftError(f"stack() got {len(members)} members but {len(chosen)} names.")
    else:
        chosen = _method_names(members)
    if len(set(chosen)) != len(chosen):
        raise PeftError(f"stack() members need distinct names; got {list(chosen)}.")
    for name in chosen:
        check_adapter_name(name)
    return Stack(members, chosen)


def _method_names(configs: Sequence[PeftConfig]) -> tuple[str, ...]:
    from peft_core.plugins import registry

    names: list[str] = []
    for config in configs:
        base = registry().method_for_config(config).name
        names.append(base if base not in names else f"{base}-{sum(n.split('-')[0] == base for n in names) + 1}")
    return tuple(names)


def check_adapter_name(name: str) -> None:
    """Refuse names that are no safe folder and module name (``../x``, ``a/b``, ``a.b``)."""
    if not isinstance(name, str) or not _VALID_NAME.fullmatch(name):
        raise PeftError(
            f"{name!r} is not a valid adapter name: use letters, digits, '_' and '-' (it becomes a folder and "
            f"a module name)."
        )


@dataclass(frozen=True)
class Manifest:
    """A saved stack's ``peft_stack.json``: its members in order, and the SHA-256 of each member's
    ``adapter_config.json`` as that save wrote it (absent in manifests of older versions)."""

    names: list[str]
    config_sha256: dict[str, str]

    def check_member(self, name: str, config_sha256: str, source: str) -> None:
        """Refuse a member whose config is not the one this manifest was saved with."""
        recorded = self.config_sha256.get(name)
        if recorded is not None and recorded != config_sha256:
            raise AdapterLoadError(
                f"{source}: member {name!r} is not the adapter {MANIFEST_NAME} was saved with (its config's SHA-256 "
                f"is {config_sha256[:12]}..., the manifest records {recorded[:12]}...): the folder mixes adapters "
                f"of different saves. Save the stack again, or load the member alone; pass verify_integrity=False "
                f"to load the folder as it is."
            )


def manifest_json(names: Sequence[str], config_sha256: dict[str, str]) -> str:
    return json.dumps({"adapters": list(names), "config_sha256": config_sha256}, indent=2) + "\n"


def read_manifest(path: str | os.PathLike) -> Manifest:
    """A saved stack's manifest, its member names checked to be safe folder names."""
    from peft_core.serialization import parse_json

    data = parse_json(Path(path).read_bytes(), str(path))
    names = data.get("adapters") if isinstance(data, dict) else None
    checksums = data.get("config_sha256", {}) if isinstance(data, dict) else None
    if not isinstance(names, list) or not names:
        raise AdapterLoadError(f"{path} is not a valid stack manifest: it lists no adapters.")
    if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
        raise AdapterLoadError(f"{path} is not a valid stack manifest: 'config_sha256' is no mapping of names to "
                               f"checksums.")
    for name in names:
        try:
            check_adapter_name(name)
        except PeftError as exc:
            raise AdapterLoadError(f"{path}: {exc}") from None
    return Manifest(names, checksums)
