"""Stopping a ``peft train`` run with a checkpoint: Ctrl-C, or a step hook that raises KeyboardInterrupt.

The Trainer has no notion of an interruption; it does save a checkpoint (adapter, optimizer, scheduler, RNG
states, its own state) whenever a callback sets ``control.should_save``, and stops at ``should_training_stop``.
So the first Ctrl-C only raises a flag, read after the step has finished: the checkpoint then matches the
weights exactly, and ``--resume`` continues as if nothing happened. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

StepHook = Callable[[int, float], None]  # (step, loss) after each step; KeyboardInterrupt from it stops the run


class CtrlC:
    """A context in which the first SIGINT sets :attr:`pressed` instead of raising KeyboardInterrupt."""

    def __init__(self) -> None:
        self.pressed = False
        self.previous: Any = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        print("\npeft train: stopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class StopWithCheckpoint(TrainerCallback):
    """Asks the Trainer for a checkpoint and a stop when Ctrl-C was pressed, when ``step_hook`` raised
    KeyboardInterrupt, or once ``stop_after`` steps are done; :attr:`stopped` tells the caller which ending
    it was. Also skips the Trainer's checkpoint of the last step: the finished adapter goes to the output
    directory itself."""

    def __init__(self, ctrl_c: CtrlC, stop_after: int | None = None, step_hook: StepHook | None = None) -> None:
        self.ctrl_c, self.stop_after, self.step_hook = ctrl_c, stop_after, step_hook
        self.stopped = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_save = False

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, float] | None = None, **kwargs: Any,
    ) -> None:
        # Logged after every step (logging_steps=1), before the Trainer decides whether to save.
        if not logs or "loss" not in logs:
            return
        try:
            if self.step_hook is not None:
                self.step_hook(state.global_step, logs["loss"])
            asked = self.ctrl_c.pressed or (self.stop_after is not None and state.global_step >= self.stop_after)
        except KeyboardInterrupt:
            asked = True
        if asked:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
