"""The ``peft`` command: see what is installed, inspect, merge and convert adapters, fine-tune a model.

Each subcommand is a module of this package with ``add_parser(subparsers)`` and ``run(args) -> int``.
Errors the user can fix (a bad path, a wrong base model, an unknown method) print one line and exit with
status 1; ``--debug`` shows the traceback instead. Usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = ("methods", "inspect", "merge", "convert", "train")


def add_legacy_bin_option(parser: argparse.ArgumentParser) -> None:
    """``--allow-legacy-bin``, for the subcommands that read adapters' weights."""
    parser.add_argument("--allow-legacy-bin", action="store_true", help="read an adapter saved only as a pickled "
                        "adapter_model.bin (tensors only, with weights_only=True); refused otherwise")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"peft_core.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"peft_core.cli.{name}":
                raise
            continue  # a subcommand not written yet
        module.add_parser(subparsers)
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
