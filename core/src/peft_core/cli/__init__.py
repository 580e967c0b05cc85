"""The ``peft`` command: see what is installed, inspect, merge and convert adapters, and whatever installed
packages add (``peft train`` comes with peft-train).

Subcommands are found like methods, through the ``peft_register_commands`` hook: the core registers its
own here, each a module of this package with ``add_parser(subparsers)`` setting ``run(args) -> int``.
Errors the user can fix (a bad path, a wrong base model, an unknown method) print one line and exit with
status 1; ``--debug`` shows the traceback instead. Usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from peft_core.plugins import hookimpl

CORE_COMMANDS = ("methods", "inspect", "merge", "convert")
DESCRIPTION = (
    "Parameter-efficient fine-tuning adapters: see which methods are installed, inspect, merge and convert "
    "saved adapters, and run the subcommands installed packages add."
)


@hookimpl(tryfirst=True)
def peft_register_commands(register: Callable[[str, Callable[[Any], Any]], None]) -> None:
    for name in CORE_COMMANDS:
        register(name, lambda subparsers, name=name: importlib.import_module(f"peft_core.cli.{name}").add_parser(
            subparsers
        ))


def add_legacy_bin_option(parser: argparse.ArgumentParser) -> None:
    """``--allow-legacy-bin``, for the subcommands that read adapters' weights."""
    parser.add_argument("--allow-legacy-bin", action="store_true", help="read an adapter saved only as a pickled "
                        "adapter_model.bin (tensors only, with weights_only=True); refused otherwise")


def build_parser() -> argparse.ArgumentParser:
    from peft_core import __version__
    from peft_core.plugins import registry

    parser = argparse.ArgumentParser(prog="peft", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"peft-core {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in registry().commands().values():
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("peft: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error becomes one line unless --debug
        if args.debug:
            raise
        print(f"peft {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 600 else text[:597] + "..."


if __name__ == "__main__":
    raise SystemExit(main())
