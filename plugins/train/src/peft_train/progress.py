"""The progress display of ``peft train``, a Trainer callback: a tqdm bar on a terminal, a plain line every
``log_every`` steps otherwise, nothing when quiet or on processes other than the first."""

from __future__ import annotations

import sys
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class Progress(TrainerCallback):
    """Step, loss, tokens per second (the Trainer counts the tokens that are not padding), learning rate, ETA."""

    def __init__(self, quiet: bool, log_every: int) -> None:
        self.quiet, self.log_every = quiet, max(1, log_every)
        self.shown = False
        self.bar: Any = None
        self.start = self.tokens_before = 0
        self.began = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.shown = not self.quiet and state.is_world_process_zero
        self.start, self.tokens_before = state.global_step, state.num_input_tokens_seen
        self.began = time.perf_counter()
        if self.shown and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, float] | None = None, **kwargs: Any,
    ) -> None:
        if not self.shown or not logs or "loss" not in logs:
            return
        step, total, loss, lr = state.global_step, state.max_steps, logs["loss"], logs.get("learning_rate", 0.0)
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        rate = (state.num_input_tokens_seen - self.tokens_before) / elapsed
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}", lr=f"{lr:.1e}", refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.log_every == 0 or step == total:
            done = step - self.start
            eta = elapsed / done * (total - step) if done else 0.0
            print(f"step {step}/{total}  loss {loss:.4f}  {rate:.0f} tok/s  lr {lr:.1e}  ETA {duration(eta)}",
                  file=sys.stderr, flush=True)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes}:{secs:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
