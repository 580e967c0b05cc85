"""The options of ``peft train``, layered, and the method's config built from them.

Options are layered, later layers winning: built-in defaults, the ``--demo`` settings, the options saved by
the run being resumed (``--resume``), the ``--config`` file, then the flags given on the command line.
Method options are checked by the method's own config class (``peft_core.field_types``): this module only
turns ``KEY=VALUE`` text into Python values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_core.errors import ConfigError, PeftError

if TYPE_CHECKING:
    from peft_core.config import PeftConfig

DEFAULTS: dict[str, Any] = {
    "model": None,
    "data": None,
    "method": "lora",
    "method_options": {},
    "epochs": 1.0,
    "steps": None,
    "lr": 1e-4,
    "batch_size": 8,
    "gradient_accumulation": 1,
    "max_length": 1024,
    "out": None,
    "seed": 0,
    "schedule": "constant",
    "max_grad_norm": 1.0,
    "mixed_precision": "no",
    "report_to": "none",
    "save_every": None,
    "log_every": 10,
    "chat_template": False,
    "system_prompt": None,
    "quiet": False,
}
# The settings of examples/smollm2_lora (its train.py defaults), for `peft train --demo`.
DEMO: dict[str, Any] = {
    "method": "lora",
    "method_options": {
        "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "steps": 60,
    "lr": 2e-3,
    "batch_size": 8,
    "seed": 0,
    "schedule": "linear",
    "max_grad_norm": 1.0,
    "chat_template": True,
    "system_prompt": "Answer briefly.",
    "out": "smollm2-lora-demo",
}
SCHEDULES = ("constant", "linear", "cosine")  # names of transformers' schedulers; the last two warm up first
PRECISIONS = ("no", "bf16", "fp16")
RUN_OPTIONS_FILE = "train_options.json"  # the resolved options, so --resume needs no flags repeated
NOT_SAVED = ("quiet",)  # options that may differ between an interrupted run and its resumption
_POSITIVE_INTS = ("steps", "batch_size", "gradient_accumulation", "save_every", "log_every", "max_length")
_NUMBERS = ("epochs", "lr", "max_grad_norm")


def read_config_file(path: Path) -> dict[str, Any]:
    """The options of a TOML or YAML file, keys spelled as the flags (``-`` or ``_``)."""
    if not path.is_file():
        raise PeftError(f"config file not found: {path}; check the --config path")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())}); fix the file") from None
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc}); fix the file, or name a .yaml file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of options (key = value) at the top level")
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in ("method_option", "method_options"):
            # A table {r = 8} or a list of KEY=VALUE strings, as on the command line.
            parsed = parse_method_options(value) if isinstance(value, list) else value
            if not isinstance(parsed, dict):
                raise ConfigError(f"{path}: method_options must be a table or a list of KEY=VALUE strings")
            options["method_options"] = {**options.get("method_options", {}), **parsed}
        elif name in DEFAULTS:
            options[name] = value
        else:
            raise ConfigError(f"{path}: unknown option {key!r}; known options: {', '.join(sorted(DEFAULTS))}")
    return options


def parse_value(text: str) -> Any:
    """A --method-option value: bool, None, int, float, JSON list/object, comma-separated list, or str."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text[:1] in "[{" and text:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{text!r} is not valid JSON; quote strings inside it, e.g. [\"q_proj\"]") from None
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part.strip()]
    return text


def parse_method_options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad --method-option {item!r}: expected KEY=VALUE, e.g. r=8")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < demo < options of the resumed run < config file < flags."""
    options: dict[str, Any] = dict(DEFAULTS)
    if args.demo:
        options.update(DEMO)
    file_options = read_config_file(args.config) if args.config else {}
    flag_options = {key: getattr(args, key) for key in DEFAULTS if getattr(args, key, None) is not None}
    if args.method_option:
        flag_options["method_options"] = parse_method_options(args.method_option)
    if args.resume:
        out = flag_options.get("out") or file_options.get("out") or options["out"]
        if not out:
            raise PeftError("--resume needs --out, the directory of the run to continue")
        saved = Path(out) / RUN_OPTIONS_FILE
        if saved.is_file():
            options.update(json.loads(saved.read_text(encoding="utf-8")))
    for layer in (file_options, flag_options):
        method_options = {**options["method_options"], **layer.get("method_options", {})}
        options.update(layer)
        options["method_options"] = method_options
    check_run_options(options)
    return options


def check_run_options(options: dict[str, Any]) -> None:
    """The options that are not the method's: numbers that are numbers, names that are known. A config file
    can hold anything, so this runs on the layered result."""
    for key in _POSITIVE_INTS:
        value = options[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{key} must be a positive integer, not {value!r}")
    for key in _NUMBERS:
        value = options[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key} must be a non-negative number, not {value!r}")
    if options["schedule"] not in SCHEDULES:
        raise ConfigError(f"schedule {options['schedule']!r} is not one of {', '.join(SCHEDULES)}")
    if options["mixed_precision"] not in PRECISIONS:
        raise ConfigError(f"mixed_precision {options['mixed_precision']!r} is not one of {', '.join(PRECISIONS)}")


def method_config(method: str, method_options: dict[str, Any], total_steps: int | None = None) -> PeftConfig:
    """An instance of the method's config class from the registry, built from the user's options, so the
    class's own checks (field types, values) judge them.

    ``total_steps`` fills ``total_step`` (AdaLoRA's rank budget schedule) when the user did not set it."""
    from peft_core import methods
    from peft_core.plugins import registry

    known = registry().methods
    if method not in known or known[method].config_class is None:
        installed = ", ".join(sorted(m.name for m in methods() if not m.broken)) or "none"
        raise ConfigError(f"unknown method {method!r}: installed methods are {installed} (see `peft methods`)")
    config_class = known[method].config_class
    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(method_options) - fields)
    if unknown:
        raise ConfigError(f"{method} has no option {unknown[0]!r} (options: {', '.join(sorted(fields))})")
    list_fields = _list_fields(config_class)
    values = {key: _one_name_as_list(value) if key in list_fields else value for key, value in method_options.items()}
    if "total_step" in fields and "total_step" not in values and total_steps:
        values["total_step"] = total_steps
    if "task_type" in fields and "task_type" not in values:
        values["task_type"] = "CAUSAL_LM"
    try:
        return config_class(**values)
    except TypeError as exc:  # a class whose checks compare before they type-check
        raise ConfigError(f"bad option for {method}: {exc}; see the fields of {config_class.__name__}") from None


def _list_fields(config_class: type) -> set[str]:
    """The fields whose annotation allows a list (resolved annotations; none when they do not resolve)."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # whatever evaluating a third party's annotations raises
        return set()
    return {
        name for name, hint in hints.items()
        if any(typing.get_origin(form) is list for form in (hint, *typing.get_args(hint)))
    }


def _one_name_as_list(value: Any) -> Any:
    # `target_modules=q_proj` means the module q_proj. Kept a str it would be a regex matched against whole
    # module paths, which a bare name never matches; so only regex-looking strings stay str.
    if isinstance(value, str) and re.fullmatch(r"[\w.\-]+", value):
        return [value]
    return value
