"""Serving one ``PeftModel`` from several threads while another thread changes its adapters.

Model calls are safe to run concurrently: the adapter assignment of a call (``adapter_names``) lives in a
context variable, not on the modules. Changing the model is not: ``set_adapter``, ``load_adapter``,
``delete_adapter``, ``add_adapter``, ``merge_adapter``, ``unmerge_adapter``, ``disable_adapter`` and
``train``/``eval`` update the layers one after another, so a call in flight would compute some layers
before the change and some after it, or fail on an adapter that is gone.

:class:`ServingModel` orders the two with a readers-writer lock: calls share it, changes take it alone,
waiting for the calls in flight to finish and holding back new ones until they are done.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from peft_core.errors import PeftError

if TYPE_CHECKING:
    import os

    from peft_core.config import PeftConfig
    from peft_core.model import PeftModel
    from peft_core.stacking import Stack


class ReadWriteLock:
    """Many threads hold the shared side at once, or one thread holds the exclusive side.

    Writer-preferring: once a thread waits for the exclusive side, new requests for the shared side wait
    behind it, so a steady stream of calls cannot starve an adapter change. Reentrant: a thread holding
    either side may take the shared side again, and the exclusive holder the exclusive side again. Taking
    the exclusive side while holding the shared side raises, since it would wait for itself forever.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0  # threads holding the shared side
        self._writer: int | None = None  # the thread holding the exclusive side
        self._writers_waiting = 0
        self._held = threading.local()  # this thread's depth of shared and exclusive holds

    @property
    def in_flight(self) -> int:
        """How many threads hold the shared side now (calls in flight)."""
        return self._readers

    @property
    def changes_waiting(self) -> int:
        """How many threads wait for the exclusive side."""
        return self._writers_waiting

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the shared side for the ``with`` block."""
        if self._depth("shared") or self._depth("exclusive"):
            # Nested: waiting here behind a waiting writer would deadlock, as the writer waits for us.
            with self._nested("shared"):
                yield
            return
        with self._condition:
            while self._writer is not None or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            with self._nested("shared"):
                yield
        finally:
            with self._condition:
                self._readers -= 1
                if not self._readers:
                    self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the exclusive side for the ``with`` block, once the shared holders have let go."""
        if self._depth("exclusive"):
            with self._nested("exclusive"):
                yield
            return
        if self._depth("shared"):
            raise PeftError(
                "This thread is serving (it holds the shared lock) and asked to change the model, which waits "
                "for every call in flight, its own included: leave the serving block before changing adapters."
            )
        with self._condition:
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._condition.wait()
            except BaseException:  # interrupted: the readers held back for this writer may go
                self._writers_waiting -= 1
                self._condition.notify_all()
                raise
            self._writers_waiting -= 1
            self._writer = threading.get_ident()
        try:
            with self._nested("exclusive"):
                yield
        finally:
            with self._condition:
                self._writer = None
                self._condition.notify_all()

    def _depth(self, side: str) -> int:
        return getattr(self._held, side, 0)

    @contextlib.contextmanager
    def _nested(self, side: str) -> Iterator[None]:
        setattr(self._held, side, self._depth(side) + 1)
        try:
            yield
        finally:
            setattr(self._held, side, self._depth(side) - 1)


class ServingModel:
    """A ``PeftModel`` that serving threads call while another thread changes its adapters.

    Calls (``served(...)``, ``served.generate(...)``) run concurrently, without autograd; each sees the
    adapters of one moment, never a change half done. Changes (``served.load_adapter(...)``, or several
    in one ``with served.changing() as model:`` block) wait for the calls in flight, and new calls wait
    for the change. Every thread must go through this object: a call made on the ``PeftModel`` itself
    is not ordered with the changes.
    """

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self.lock = ReadWriteLock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``model(...)`` (with ``adapter_names`` for a mixed batch), under the shared lock."""
        with self.lock.shared(), torch.no_grad():
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate(...)``, under the shared lock."""
        with self.lock.shared(), torch.no_grad():
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def serving(self) -> Iterator[PeftModel]:
        """The model, for several calls that must all see the same adapters."""
        with self.lock.shared():
            yield self.model

    @contextlib.contextmanager
    def changing(self) -> Iterator[PeftModel]:
        """The model, alone: no call runs during the block (e.g. ``delete_adapter`` then ``load_adapter``
        under the same name, which no call may see half done)."""
        with self.lock.exclusive():
            yield self.model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, **kwargs: Any) -> None:
        """Load an adapter to serve beside the others. One whose file would change tensors of the base model
        (trained biases, embeddings) is refused while other adapters are served, as is any adapter while one
        has changed them: each adapter must run on the base model it was trained for."""
        with self.changing() as model:
            model.load_adapter(model_id, adapter_name, shared_base=bool(model.peft_config), **kwargs)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, **kwargs: Any) -> None:
        with self.changing() as model:
            if model.peft_config:
                model.refuse_changed_base(adapter_name)
            model.add_adapter(adapter_name, peft_config, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        with self.changing() as model:
            model.delete_adapter(adapter_name)

    def set_adapter(self, adapter_name: str | list[str] | Stack) -> None:
        with self.changing() as model:
            model.set_adapter(adapter_name)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        with self.changing() as model:
            model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        with self.changing() as model:
            model.unmerge_adapter()
