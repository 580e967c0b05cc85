"""Mixed batches: a different adapter (or none) for each sample of one model call.

``PeftModel.forward(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])`` set the
:class:`MixedBatch` of the call in a context variable for its duration; adapter layers read it there.
Nothing is stored on modules, so calls from several threads, each with its own assignment, do not meet.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

BASE = "__base__"  # the name that asks for the base model alone


@dataclass(frozen=True)
class MixedBatch:
    """``names``: the distinct adapters used; ``index[b]``: the slot of sample ``b``'s adapter in
    ``names``, or ``len(names)`` for the base model."""

    names: tuple[str, ...]
    index: torch.Tensor  # (batch,) long

    @classmethod
    def of(cls, adapter_names: Sequence[str]) -> MixedBatch:
        names = tuple(dict.fromkeys(n for n in adapter_names if n != BASE))
        slots = {name: i for i, name in enumerate(names)}
        index = torch.tensor([slots.get(n, len(names)) for n in adapter_names], dtype=torch.long)
        return cls(names, index)

    def index_for(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The per-sample slots for a batch of ``batch_size`` rows: generation with beams or several
        sequences per prompt repeats each sample, consecutively."""
        index = self.index
        if batch_size != len(index):
            index = index.repeat_interleave(batch_size // len(index))
        return index.to(device)

    def samples_of(self, name: str) -> list[int]:
        slot = self.names.index(name)
        return [b for b, s in enumerate(self.index.tolist()) if s == slot]


_current: contextvars.ContextVar[MixedBatch | None] = contextvars.ContextVar("peft_mixed_batch", default=None)


def current_mixed_batch() -> MixedBatch | None:
    """The mixed batch of the model call running in this thread, if it is one."""
    return _current.get()


@contextlib.contextmanager
def mixed_batch(batch: MixedBatch | None) -> Iterator[None]:
    token = _current.set(batch)
    try:
        yield
    finally:
        _current.reset(token)
