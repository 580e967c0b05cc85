"""The output directory of ``peft train``: what an earlier run left there, and the loss files of this one.

``--out`` holds the finished adapter (``adapter_config.json``, ``adapter_model.safetensors``), the
Trainer's ``checkpoint-N`` folders, ``losses.json``, ``loss.png`` and the run's options.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from peft_core.errors import PeftError

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
# The Trainer writes its state last: a checkpoint cut short (a second Ctrl-C) lacks it and is ignored.
COMPLETE_MARK = "trainer_state.json"
ADAPTER_MARK = "adapter_config.json"  # written by save_pretrained at the end of a finished run


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The complete ``checkpoint-N`` folders in ``out``, by step."""
    found = []
    if out.is_dir():
        for child in out.iterdir():
            match = CHECKPOINT_PATTERN.fullmatch(child.name)
            if match and (child / COMPLETE_MARK).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def prepare_out(out: Path, resume: bool, force: bool) -> Path | None:
    """Check what an earlier run left in ``out``; return the checkpoint to resume from, if ``resume``.

    A finished adapter is replaced only with ``force`` (as ``peft merge`` writes into a non-empty --out).
    Checkpoints of an earlier run are continued with ``resume``, or removed with ``force``: a fresh run among
    them would let a later ``--resume`` continue the wrong run."""
    if out.exists() and not out.is_dir():
        raise PeftError(f"--out {out} is a file; give a directory")
    found = checkpoints(out)
    finished = (out / ADAPTER_MARK).is_file()
    if finished and not force:
        raise PeftError(f"--out {out} holds a finished adapter of an earlier run; pass --force to replace it, or "
                        "choose another --out")
    if resume:
        if not found:
            where = "does not exist" if not out.exists() else "holds no checkpoint (no complete checkpoint-N folder)"
            raise PeftError(f"--resume: {out} {where}, so there is nothing to continue; run without --resume to "
                            "start, and add --save-every N to write checkpoints along the way")
        return found[-1][1]
    if found:
        if not force:
            raise PeftError(f"--out {out} holds checkpoints of an earlier run (up to {found[-1][1].name}); add "
                            "--resume to continue it, --force to start afresh, or choose another --out")
        for _, folder in found:
            shutil.rmtree(folder, ignore_errors=True)  # every process of a launch does this
    return None


def losses_of(log_history: Sequence[dict[str, float]]) -> list[float]:
    """The loss of every step, from the Trainer's log (logged every step; kept across a resume)."""
    return [entry["loss"] for entry in log_history if "loss" in entry]


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
