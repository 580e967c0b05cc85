"""The pytest plugin of peft-core (entry point ``pytest11``), active wherever peft-core is installed.

It holds only what must be automatic: the parametrisation of :class:`~peft_core.testing.conformance.
MethodConformance` subclasses over the tiny models they list, with the folder each model is saved in, so a
plugin's conformance tests need no ``conftest.py``. It adds no fixture: those are opt-in, in
:mod:`peft_core.testing.fixtures`.
"""

from __future__ import annotations

import sys

import pytest


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A class can only subclass MethodConformance once its module is imported: test sessions that never
    # import it do not pay for torch here.
    conformance = sys.modules.get("peft_core.testing.conformance")
    cls = metafunc.cls
    if conformance is None or cls is None or not issubclass(cls, conformance.MethodConformance):
        return
    if "kind" not in metafunc.fixturenames:
        return
    kinds = list(cls.models)
    if "tiny_model_dir" not in metafunc.fixturenames:
        metafunc.parametrize("kind", kinds)
        return
    from peft_core.testing.models import saved_tiny_model

    # The suite's checks take ``tiny_model_dir(kind)``; it comes with the parametrisation (the same
    # per-process folders as the opt-in fixture of that name), and the test ids stay the kinds.
    metafunc.parametrize(["kind", "tiny_model_dir"], [(kind, saved_tiny_model) for kind in kinds], ids=kinds)
