"""One exception hierarchy: what a user can get wrong raises a ``peft_core.errors`` class, whose message names
the fix (``ConfigError`` is also a ``ValueError``, so callers catching that keep working)."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILTIN_EXCEPTIONS = {
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
}
# Builtin exceptions that are Python protocols, not user errors: NotImplementedError for a method a subclass
# must provide, SystemExit for a command's exit status, KeyboardInterrupt for a signal turned into Python's
# interruption, AssertionError for code that cannot be reached, and AttributeError from a module's
# __getattr__ (hasattr and `from m import x` rely on it; checked separately below).
PROTOCOL_EXCEPTIONS = {"NotImplementedError", "SystemExit", "KeyboardInterrupt", "AssertionError"}


def shipped_sources() -> list[Path]:
    """Every Python file the distributions ship: the core, each plugin, the example plugin."""
    roots = [REPO / "core" / "src", *sorted((REPO / "plugins").glob("*/src")), REPO / "examples/peft-bitfit/src"]
    return [source for root in roots for source in sorted(root.rglob("*.py"))]


def builtin_raises(code: str) -> list[tuple[int, str]]:
    """``(line, exception name)`` of each ``raise`` of a builtin exception that is not a protocol's."""
    tree = ast.parse(code)
    in_getattr = {
        id(node) for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef) and function.name == "__getattr__"
        for node in ast.walk(function)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue  # a bare `raise` re-raises what was caught
        raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        name = raised.id if isinstance(raised, ast.Name) else None
        if name not in BUILTIN_EXCEPTIONS or name in PROTOCOL_EXCEPTIONS:
            continue
        if name == "AttributeError" and id(node) in in_getattr:
            continue
        found.append((node.lineno, name))
    return sorted(found)


def test_shipped_code_raises_no_builtin_exception_for_user_errors():
    found = [
        f"{source.relative_to(REPO)}:{line} raises {name}"
        for source in shipped_sources() for line, name in builtin_raises(source.read_text())
    ]
    assert not found, "raise a peft_core.errors class whose message names the fix:\n" + "\n".join(found)


def test_the_check_finds_builtin_raises_and_leaves_protocols_alone():
    code = (
        "def f(x):\n"
        "    if x:\n        raise ValueError('bad')\n"
        "    raise RuntimeError\n"
        "def g():\n    raise NotImplementedError\n"
        "def __getattr__(name):\n    raise AttributeError(name)\n"
        "def h():\n    raise AttributeError('not a module protocol')\n"
        "def i():\n    raise ConfigError('fine')\n"
    )
    assert builtin_raises(code) == [(3, "ValueError"), (4, "RuntimeError"), (10, "AttributeError")]
