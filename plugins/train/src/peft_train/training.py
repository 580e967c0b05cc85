"""A ``peft train`` run on transformers' Trainer.

The options become ``TrainingArguments`` and :class:`~peft_train.trainer.PeftTrainer` runs the loop: AdamW,
the learning-rate schedule and its warm-up, gradient clipping and accumulation, mixed precision, the
shuffled data order of each epoch, logging integrations (``report_to``), checkpoints and their exact
resumption, and multi-process launches (``accelerate launch``, ``torchrun``) are all the Trainer's. What
``peft train`` adds are callbacks: the method hooks after each optimizer step, the progress display, and a
checkpoint on Ctrl-C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from peft_core.errors import ConfigError

if TYPE_CHECKING:
    from peft_core.model import PeftModel
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from peft_train.stopping import StepHook

WARMUP = 0.1  # the share of the steps over which a decaying schedule first warms up


@dataclass
class TrainSettings:
    """Everything the run needs, already resolved from defaults, a config file and flags."""

    steps: int  # optimizer steps in all (see total_steps for --epochs)
    lr: float = 1e-4
    batch_size: int = 8  # examples per forward pass, on each process
    gradient_accumulation: int = 1
    seed: int = 0
    schedule: str = "constant"  # a transformers scheduler name: constant, linear, cosine
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # or bf16, fp16
    report_to: list[str] = field(default_factory=list)  # transformers' logging integrations
    save_every: int | None = None
    log_every: int = 10
    quiet: bool = False
    use_cpu: bool = False  # train on the CPU even where an accelerator is available
    stop_after: int | None = None  # tests: act as Ctrl-C once this step is done


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # of every step, the resumed run's earlier ones included
    interrupted: bool = False
    checkpoint: Path | None = None  # the checkpoint an interruption saved
    steps: int = 0
    main_process: bool = True  # the process that writes files and prints (the only one unless launched)


def total_steps(count: int, batch_size: int, gradient_accumulation: int, epochs: float, processes: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``count`` examples, counted as the Trainer counts them: each
    process takes every ``processes``-th batch, and a step accumulates ``gradient_accumulation`` batches."""
    batches = math.ceil(math.ceil(count / batch_size) / processes)
    return max(1, math.ceil(epochs * math.ceil(batches / gradient_accumulation)))


def training_arguments(settings: TrainSettings, out: Path) -> TrainingArguments:
    from transformers import TrainingArguments

    # Without an accelerator the Trainer runs on the CPU anyway; saying so lets bf16 autocast run there too.
    use_cpu = settings.use_cpu or not has_accelerator()
    return TrainingArguments(
        output_dir=str(out),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        learning_rate=settings.lr,
        weight_decay=0.0,
        lr_scheduler_type=settings.schedule,
        warmup_steps=0.0 if settings.schedule == "constant" else WARMUP,
        max_grad_norm=settings.max_grad_norm,
        bf16=settings.mixed_precision == "bf16",
        fp16=settings.mixed_precision == "fp16",
        seed=settings.seed,
        use_cpu=use_cpu,
        # Checkpoints every --save-every steps; StopWithCheckpoint asks for one on Ctrl-C whatever this says.
        save_strategy="steps" if settings.save_every else "no",
        save_steps=settings.save_every or 1,
        # Every step is logged: losses.json, the progress display and Ctrl-C read the step's loss there.
        logging_strategy="steps",
        logging_steps=1,
        report_to=settings.report_to or "none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,  # peft_train.progress draws the bar
        dataloader_pin_memory=not use_cpu,  # on the CPU torch warns that it cannot pin
    )


def has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 knows every kind (CUDA, XPU, MPS, ...)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def check_report_to(names: list[str]) -> None:
    """Refuse unknown logging integrations before the model loads (the Trainer would, after)."""
    from transformers.integrations.integration_utils import get_reporting_integration_callbacks

    try:
        get_reporting_integration_callbacks(names)
    except ValueError as exc:
        raise ConfigError(f"--report-to: {exc} Each needs its own package too (pip install tensorboard, ...).") \
            from None


def train(
    model: PeftModel,
    features: Sequence[dict[str, list[int]]],
    collator: DataCollatorForSeq2Seq,
    settings: TrainSettings,
    out: Path,
    resume_from: Path | None = None,
    step_hook: StepHook | None = None,
) -> TrainResult:
    """Train the parameters of the PeftModel ``model`` that require grad; save the adapter to ``out``.

    ``step_hook(step, loss)`` runs after each step; a KeyboardInterrupt from it, or Ctrl-C, saves a checkpoint
    of the last finished step and returns with ``interrupted=True`` (the adapter is then not saved to ``out``).
    """
    from transformers.trainer_callback import PrinterCallback

    from peft_train.method_steps import MethodSteps
    from peft_train.outputs import losses_of
    from peft_train.progress import Progress
    from peft_train.stopping import CtrlC, StopWithCheckpoint
    from peft_train.trainer import PeftTrainer

    with CtrlC() as ctrl_c:
        stopper = StopWithCheckpoint(ctrl_c, settings.stop_after, step_hook)
        trainer = PeftTrainer(
            model=model, args=training_arguments(settings, out), train_dataset=features, data_collator=collator,
            callbacks=[MethodSteps(model), Progress(settings.quiet, settings.log_every), stopper],
        )
        trainer.remove_callback(PrinterCallback)  # it prints every log entry; Progress shows them instead
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    step = trainer.state.global_step
    result = TrainResult(losses=losses_of(trainer.state.log_history), interrupted=stopper.stopped, steps=step,
                         main_process=trainer.is_world_process_zero())
    if stopper.stopped:
        result.checkpoint = out / f"checkpoint-{step}"
    else:
        trainer.save_model(str(out))
    return result
