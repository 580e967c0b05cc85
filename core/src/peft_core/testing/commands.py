"""Running the ``peft`` command in a test, for the core's subcommands and those plugins add."""

from __future__ import annotations

from typing import Any


def run_peft(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """Run ``peft ARGV...`` in this process; (exit status, stdout, stderr), read through pytest's ``capsys``."""
    from peft_core.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, command: str) -> str:
    """The error line of a failed ``peft COMMAND``, checked to be the one line, with no traceback, that every
    subcommand's user errors give."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"peft {command}: error: ")
    assert "Traceback" not in err
    return lines[0]
