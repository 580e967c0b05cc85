"""The machinery behind ``peft train``: reading examples, the training loop, checkpoints and the loss curve.

Kept apart from the argument handling in :mod:`peft_core.cli.train` so the loop can be driven from Python
too. Everything torch-heavy is imported inside functions: importing this module stays cheap.

Determinism: the data order of every epoch is a pure function of ``(seed, epoch)`` and the batch of a
step a pure function of the step, so a resumed run needs only the step, the optimizer and scheduler
states and the torch RNG state (dropout) to continue exactly where an interrupted one stopped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label cross_entropy skips: padding and prompt tokens
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.pt"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TrainSettings:
    """Everything the loop needs, already resolved from defaults, a config file and flags."""

    steps: int | None = None
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 8
    seed: int = 0
    schedule: str = "constant"  # or "linear": 10% warm-up, then linear decay to zero
    max_grad_norm: float = 1.0
    save_every: int | None = None
    log_every: int = 10
    quiet: bool = False
    stop_after: int | None = None  # tests: raise KeyboardInterrupt once this step is done


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    checkpoint: Path | None = None
    steps: int = 0


# -- data ---------------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict[str, Any]]:
    """The raw rows of a JSONL, CSV, TXT file or a ``save_to_disk`` dataset folder."""
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{path} is a DatasetDict without a 'train' split (splits: {', '.join(loaded)})")
            loaded = loaded["train"]
        return [dict(row) for row in loaded]
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        return rows
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".txt":
        return [{"text": line} for line in text.splitlines() if line.strip()]
    raise ValueError(f"unsupported data file {path.name}: use .jsonl, .csv, .txt or a save_to_disk folder")


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    system_prompt: str | None = None,
    chat_template: bool = False,
) -> list[Example]:
    """Rows with ``text`` train on every token; rows with ``prompt`` and ``completion`` (or ``answer``)
    train on the completion only, so the model learns to answer rather than to repeat prompts."""
    examples = []
    for number, row in enumerate(records, 1):
        completion = row.get("completion", row.get("answer"))
        if "prompt" in row and completion is not None:
            prompt = str(row["prompt"])
            if chat_template:
                messages = [{"role": "user", "content": prompt}]
                if system_prompt:
                    messages.insert(0, {"role": "system", "content": system_prompt})
                prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                # The template holds every special token the prompt needs; adding more would shift it.
                prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            else:
                prompt_ids = tokenizer(prompt).input_ids
            answer_ids = tokenizer(str(completion), add_special_tokens=False).input_ids
            if tokenizer.eos_token_id is not None:
                answer_ids.append(tokenizer.eos_token_id)  # so the model also learns to stop
            ids = prompt_ids + answer_ids
            labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        elif "text" in row and row["text"] is not None:
            ids = tokenizer(str(row["text"])).input_ids
            labels = list(ids)
        else:
            raise ValueError(f"example {number} has neither 'text' nor 'prompt' + 'completion' (keys: {sorted(row)})")
        if max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):  # else there is nothing to predict
            examples.append(Example(ids, labels))
    if not examples:
        raise ValueError("no usable example in the data (empty, or every example truncated away)")
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    import torch

    width = max(len(ex.input_ids) for ex in examples)
    input_ids, mask, labels = [], [], []
    for ex in examples:
        pad = width - len(ex.input_ids)
        input_ids.append(ex.input_ids + [pad_id] * pad)
        mask.append([1] * len(ex.input_ids) + [0] * pad)
        labels.append(ex.labels + [IGNORE_INDEX] * pad)
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def steps_per_epoch(count: int, batch_size: int) -> int:
    return math.ceil(count / batch_size)


def batch_indices(step: int, count: int, batch_size: int, seed: int) -> list[int]:
    """The example indices of (0-based) ``step``: epoch ``e`` is a shuffle seeded by ``(seed, e)``, cut into
    batches; the last batch of an epoch may be smaller. Stateless, so resuming needs only the step."""
    per_epoch = steps_per_epoch(count, batch_size)
    epoch, index = divmod(step, per_epoch)
    order = random.Random(f"{seed}:{epoch}").sample(range(count), count)
    return order[index * batch_size : (index + 1) * batch_size]


# -- the loop -----------------------------------------------------------------------------------------


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the tokens that have a label: each token counts the same, however the
    batch is padded."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Soft-prompt methods prepend virtual tokens to the sequence; their positions predict nothing.
    logits = logits[:, -batch["input_ids"].shape[1] :]
    targets = batch["labels"][:, 1:]  # the logits at position t predict the token at t + 1
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def make_schedule(optimizer: Any, kind: str, total: int) -> Any:
    import torch

    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if kind == "linear":
        warmup = max(1, total // 10)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, min((step + 1) / warmup, (total - step) / (total - warmup + 1)))
        )
    raise ValueError(f"unknown schedule {kind!r}: use constant or linear")


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    if out.is_dir():
        for child in out.iterdir():
            match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def save_checkpoint(model: Any, optimizer: Any, schedule: Any, step: int, losses: list[float], out: Path) -> Path:
    import torch

    target = out / f"{CHECKPOINT_PREFIX}{step}"
    model.save_pretrained(target)
    state = {
        "step": step,
        "losses": list(losses),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),  # dropout draws from it: needed for an identical resume
    }
    # Written last and atomically: a checkpoint counts only once its state file exists, so one cut
    # short by a second Ctrl-C is ignored by --resume instead of half-read.
    tmp = target / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, target / STATE_FILE)
    return target


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    import torch

    # The file holds plain tensors, numbers and dicts written by save_checkpoint; weights_only keeps
    # torch.load from running code from a tampered file.
    return torch.load(path / STATE_FILE, weights_only=True)


class _SigintFlag:
    """Turns the first SIGINT into a flag checked between steps, so Ctrl-C never lands in the middle of
    an optimizer step (which would leave the weights half-updated); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.raised = False
        self.previous: Any = None

    def __enter__(self) -> _SigintFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True
        print("\npeft train: stopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Progress:
    """A tqdm bar on a terminal; a plain line every ``log_every`` steps otherwise; nothing when quiet."""

    def __init__(self, total: int, start: int, quiet: bool, log_every: int) -> None:
        self.total, self.start, self.log_every = total, start, max(1, log_every)
        self.quiet = quiet
        self.began = time.perf_counter()
        self.tokens = 0
        self.bar: Any = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=start, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def update(self, step: int, loss: float, tokens: int, lr: float) -> None:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        rate = self.tokens / elapsed
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}", lr=f"{lr:.1e}", refresh=False)
            self.bar.update(1)
        elif not self.quiet and (step % self.log_every == 0 or step == self.total):
            done = step - self.start
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {rate:.0f} tok/s  lr {lr:.1e}  ETA {_duration(eta)}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes}:{secs:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def train(
    model: Any,
    examples: Sequence[Example],
    pad_id: int,
    settings: TrainSettings,
    out: Path,
    resume_from: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    after_optimizer_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad; save checkpoints under ``out``.

    ``on_step(step, loss)`` runs after each optimizer step (a hook for tests and callers); a
    KeyboardInterrupt, from it or from Ctrl-C, saves a checkpoint of the last finished step and returns
    with ``interrupted=True``. ``after_optimizer_step(step_index)`` runs between the optimizer step and
    ``zero_grad`` (AdaLoRA's rank allocation needs the gradients).
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: check the method options (target_modules?)")
    per_epoch = steps_per_epoch(len(examples), settings.batch_size)
    total = settings.steps if settings.steps is not None else max(1, math.ceil(settings.epochs * per_epoch))
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = make_schedule(optimizer, settings.schedule, total)

    result = TrainResult()
    step = 0
    if resume_from is not None:
        state = load_checkpoint_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        result.losses = [float(x) for x in state["losses"]]
    if step >= total:
        result.steps = step
        return result

    model.train()
    progress = Progress(total, step, settings.quiet, settings.log_every)
    try:
        with _SigintFlag() as sigint:
            while step < total:
                picked = batch_indices(step, len(examples), settings.batch_size, settings.seed)
                batch = collate([examples[i] for i in picked], pad_id)
                loss = token_loss(model, batch)
                loss.backward()
                if settings.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                lr = schedule.get_last_lr()[0]  # the rate this step used, before the schedule moves on
                schedule.step()
                if after_optimizer_step is not None:
                    after_optimizer_step(step)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                result.losses.append(loss.item())
                progress.update(step, loss.item(), int(batch["attention_mask"].sum()), lr)
                if settings.save_every and step % settings.save_every == 0 and step < total:
                    save_checkpoint(model, optimizer, schedule, step, result.losses, out)
                if on_step is not None:
                    on_step(step, result.losses[-1])
                if sigint.raised or (settings.stop_after is not None and step >= settings.stop_after):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        # `step` counts finished optimizer steps; a step cut short never reached optimizer.step()
        # (a real Ctrl-C only stops between steps), so the model matches `step`.
        progress.close()
        optimizer.zero_grad(set_to_none=True)
        result.interrupted = True
        result.checkpoint = save_checkpoint(model, optimizer, schedule, step, result.losses, out)
        result.steps = step
        return result
    progress.close()
    result.steps = step
    return result


# -- outputs ------------------------------------------------------------------------------------------


def write_losses(out: Path, losses: Sequence[float]) -> Path:
    path = out / "losses.json"
    path.write_text(json.dumps({"losses": list(losses)}, indent=1) + "\n", encoding="utf-8")
    return path


def plot_losses(out: Path, losses: Sequence[float]) -> Path | None:
    """``out/loss.png``, or None when matplotlib is not installed (the curve is in losses.json anyway)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display needed, and never pop up a window
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    steps = range(1, len(losses) + 1)
    axes.plot(steps, losses, linewidth=1, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                  for i in range(len(losses))]
        axes.plot(steps, smooth, linewidth=2, label=f"mean of {window}")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = out / "loss.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

