"""``peft inspect``: what a saved adapter (or stack of adapters) is, without loading a model.

It reads ``adapter_config.json`` as plain JSON, so an adapter of a method whose plugin is not installed
can still be inspected, and the weights file only for tensor shapes and dtypes. What only the method knows
(its rank, the ranks its factors really have) comes from its plugin's ``peft_describe`` hook, and is shown as
the plugin gives it.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

from peft_core.cli import add_legacy_bin_option

if TYPE_CHECKING:
    import torch

    from peft_core.stacking import Manifest

# Config fields of the core's own config classes that say how big an adapter is: a soft prompt's length
# (PromptLearningConfig). A method's own size fields are its plugin's to describe.
CORE_SIZE_FIELDS = ("num_virtual_tokens",)
# The fields describe_one sets after the plugin's; a plugin's field of the same name is left out.
_CORE_FACTS = frozenset({
    "parameters", "tensors", "file", "file_size", "dtypes", "integrity", "replaces_base_tensors", "name", "stack",
    "members",
})


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect", help="describe a saved adapter or stack",
        description="Describe a saved adapter: method, base model, task type, target modules, what its method's "
        "plugin reports (such as its rank), parameter and tensor counts, file size, dtypes. "
        "PATH_OR_REPO is a directory written by save_pretrained, a stack directory (peft_stack.json), or a Hugging "
        "Face Hub repo id.",
    )
    parser.add_argument("path", metavar="PATH_OR_REPO", help="adapter directory or Hub repo id")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    parser.add_argument("--subfolder", help="folder inside the directory or repo that holds the adapter")
    parser.add_argument("--token", help="Hugging Face token for a private or gated repo (default: HF_TOKEN or the "
                        "stored login)")
    parser.add_argument("--json", action="store_true", help="print a JSON object, for scripts")
    add_legacy_bin_option(parser)
    parser.set_defaults(run=run)
    return parser


def describe(path_or_repo: str, allow_legacy_bin: bool = False, **hub_kwargs: Any) -> dict[str, Any]:
    """A JSON-ready description of the adapter or stack at ``path_or_repo``.

    A stack gives ``{"stack": [names], "members": [descriptions], ...totals}``.
    """
    from peft_core.serialization import reading, resolve_file
    from peft_core.stacking import MANIFEST_NAME, read_manifest

    with reading(path_or_repo):  # every file from one save
        manifest = resolve_file(path_or_repo, MANIFEST_NAME, required=False, **hub_kwargs)
        if manifest is None:
            return describe_one(path_or_repo, allow_legacy_bin, **hub_kwargs)
        from peft_core.model import _member_kwargs

        stack = read_manifest(manifest)
        members = [
            {"name": name, **describe_one(path_or_repo, allow_legacy_bin, stack, name,
                                          **_member_kwargs(name, hub_kwargs))}
            for name in stack.names
        ]
    return {
        "source": str(path_or_repo),
        "stack": stack.names,
        "parameters": sum(m["parameters"] for m in members),
        "tensors": sum(m["tensors"] for m in members),
        "file_size": sum(m["file_size"] for m in members),
        "members": members,
    }


def describe_one(
    path_or_repo: str, allow_legacy_bin: bool = False, manifest: Manifest | None = None, name: str = "",
    **hub_kwargs: Any,
) -> dict[str, Any]:
    from peft_core.errors import AdapterLoadError
    from peft_core.serialization import read_adapter

    saved = read_adapter(path_or_repo, allow_legacy_bin=allow_legacy_bin, verify_integrity=False, **hub_kwargs)
    config, tensors = saved.config, saved.tensors
    if not isinstance(config.get("peft_type"), str):
        raise AdapterLoadError(f"{path_or_repo}: adapter_config.json has no peft_type; it is not an adapter config.")
    try:  # reported, not raised: inspecting a damaged adapter is how one finds out what is wrong with it
        integrity = saved.verify()
        if manifest is not None:
            manifest.check_member(name, saved.config_sha256, str(path_or_repo))
    except AdapterLoadError as exc:
        integrity = f"MISMATCH: {exc}"
    prefixes = _tensor_prefixes(config["peft_type"])
    head = {
        "source": str(path_or_repo) if not hub_kwargs.get("subfolder") else f"{path_or_repo}/{hub_kwargs['subfolder']}",
        "peft_type": config["peft_type"],
        "base_model": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "target_modules": config.get("target_modules"),
        **{field: config[field] for field in CORE_SIZE_FIELDS if config.get(field) not in (None, {}, [])},
    }
    described = plugin_description(config, tensors)
    return {
        **head,
        # The core's own facts win a clash: a plugin adds fields, it does not restate the core's.
        **{key: value for key, value in described.items() if key not in head and key not in _CORE_FACTS},
        "parameters": sum(t.numel() for t in tensors.values()),
        "tensors": len(tensors),
        "file": os.path.basename(saved.weights_file),
        "file_size": os.path.getsize(saved.weights_file),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "integrity": integrity,
        # None: the method's plugin is not installed, or declares no tensor names to tell them apart by.
        "replaces_base_tensors": None if prefixes is None else replaced_base_keys(
            list(tensors), prefixes, config.get("modules_to_save") or []
        ),
    }


def plugin_description(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the adapter's method says about it through ``peft_describe`` (nothing if no plugin answers).

    A plugin that fails is reported in the description rather than raised, as a damaged file is: inspecting
    is how one finds out what is wrong.
    """
    from peft_core.plugins import registry

    try:
        function, described = registry().first_answer("peft_describe", config=config, tensors=tensors)
    except Exception as exc:  # a plugin's bug, or a file it cannot make sense of
        return {"description_error": f"peft_describe failed: {type(exc).__name__}: {exc}"}
    if described is not None and not isinstance(described, dict):
        return {"description_error": f"{function.__module__}.peft_describe returned {type(described).__name__}, "
                                     f"not a dict of fields; fix or upgrade that plugin."}
    return described or {}


def _tensor_prefixes(peft_type: str) -> tuple[str, ...] | None:
    from peft_core.errors import PluginError
    from peft_core.plugins import registry

    try:
        return registry().method_for_peft_type(peft_type).tensor_prefixes
    except PluginError:
        return None


def replaced_base_keys(keys: list[str], tensor_prefixes: tuple[str, ...], modules_to_save: list[str]) -> list[str]:
    """The saved keys that address tensors of the base model itself, told from the file alone: keys under
    ``base_model.model.`` that are neither the method's own tensors (a name starting with one of its
    ``tensor_prefixes``) nor a ``modules_to_save`` copy. A module's original saved beside its copy
    (Hugging Face PEFT's ``original_module``) is a base tensor."""
    from peft_core.base_tensors import SAVED_PREFIX
    from peft_core.walk import matches

    found = []
    for key in keys:
        if not key.startswith(SAVED_PREFIX):
            continue  # soft prompt rows, which are the method's own
        parts = key.removeprefix(SAVED_PREFIX).split(".")
        if tensor_prefixes and any(part.startswith(tensor_prefixes) for part in parts):
            continue
        if "original_module" not in parts and ("modules_to_save" in parts or any(
            matches(".".join(parts[:end]), modules_to_save) for end in range(1, len(parts))
        )):
            continue
        found.append(key)
    return sorted(found)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _print_one(info: dict[str, Any], indent: str = "") -> None:
    skip = {"source", "name", "file", "file_size", "parameters", "tensors"}
    print(f"{indent}source:         {info['source']}")
    for key, value in info.items():
        if key == "replaces_base_tensors" and value == []:
            value = "none"
        if key in skip or value in (None, [], {}):
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        shown = json.dumps(value) if isinstance(value, dict) else shown
        print(f"{indent}{key + ':':<15} {shown}")  # a space even after a long name
    print(f"{indent}{'parameters:':<16}{info['parameters']:,}")
    print(f"{indent}{'tensors:':<16}{info['tensors']}")
    print(f"{indent}{'file:':<16}{info['file']} ({_size(info['file_size'])}, {info['file_size']} bytes)")


def run(args: argparse.Namespace) -> int:
    from peft_core.cli.hub_access import hub_access

    access = hub_access(args.path, args.revision, args.subfolder, args.token)
    with access.explaining(args.path):
        info = describe(args.path, args.allow_legacy_bin, **access.kwargs)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if "stack" not in info:
        _print_one(info)
        return 0
    print(f"stack of {len(info['stack'])} adapters: {', '.join(info['stack'])}")
    print(f"parameters:   {info['parameters']:,} in {info['tensors']} tensors, {_size(info['file_size'])}")
    for member in info["members"]:
        print(f"\n[{member['name']}]")
        _print_one(member, indent="  ")
    return 0
