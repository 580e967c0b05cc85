"""peft-train's hook implementation (the entry point ``peft_core: train``): the ``peft train`` subcommand."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from peft_core import hookimpl

PEFT_CORE_API = 1  # the version of peft-core's plugin API this plugin is written for


@hookimpl
def peft_register_commands(register: Callable[[str, Callable[[Any], Any]], None]) -> None:
    # The command module is imported only when the parser is built, and it defers torch and transformers to
    # the run itself, so `peft --help` stays fast.
    register("train", lambda subparsers: importlib.import_module("peft_train.command").add_parser(subparsers))
