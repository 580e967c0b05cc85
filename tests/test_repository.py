"""The repository's promises about itself: CI runs the README's test command."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci_command
    readme_lines = [line.split("#")[0].strip() for line in (REPO / "README.md").read_text().splitlines()]
    assert ci_command in readme_lines


def test_every_distribution_declares_its_entry_points_under_the_core_group():
    for pyproject in (REPO / "plugins").glob("*/pyproject.toml"):
        text = pyproject.read_text()
        assert "[project.entry-points.peft_core]" in text, pyproject
        assert 'dependencies = ["peft-core' in text, pyproject


# What the core's code may not name: a method, its peft_type, its tensors or its quantization backend. Short
# words count only as whole parts of a name ("dora" in use_dora, not in "adorable").
METHOD_WORDS = re.compile(
    r"lora|ia3|adalora|qlora|pissa|total_step|bitsandbytes|params4bit|linear4bit|prefix_tuning|prompt_tuning"
    r"|p_tuning|bitfit|loha|lokr|(?<![a-z])(dora|bnb|oft|vera)(?![a-z])",
    re.IGNORECASE,
)


def _names_in_code(tree: ast.AST) -> list[tuple[int, str]]:
    """Every identifier and string constant of a module, docstrings left out (they may give examples)."""
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            found.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append((node.lineno, node.name))
        elif isinstance(node, ast.arg):
            found.append((node.lineno, node.arg))
        elif isinstance(node, ast.alias):
            found.append((getattr(node, "lineno", 0), node.name))
    return found


def test_the_core_names_no_method():
    """No identifier or string constant in the core's code names a method, its tensors or its backend:
    everything a method needs reaches the core through a hook."""
    offenders = []
    for source in sorted((REPO / "core" / "src" / "peft_core").rglob("*.py")):
        for line, name in _names_in_code(ast.parse(source.read_text())):
            if METHOD_WORDS.search(name):
                offenders.append(f"{source.relative_to(REPO)}:{line} {name[:60]!r}")
    assert not offenders, "\n".join(offenders)


def test_the_method_check_catches_what_it_should():
    code = (
        'def f(use_dora):\n    """LoRA in a docstring is fine."""\n    x = "lora_A.weight"\n    return bnb.Linear4bit\n'
    )
    names = {n for _, n in _names_in_code(ast.parse(code)) if METHOD_WORDS.search(n)}
    assert names == {"lora_A.weight", "use_dora", "bnb", "Linear4bit"}
    assert not METHOD_WORDS.search("soft_prompt") and not METHOD_WORDS.search("adorable")


def test_ci_installs_every_plugin():
    setup = (REPO / ".ci" / "setup").read_text()
    for plugin in (REPO / "plugins").iterdir():
        assert f"-e ./plugins/{plugin.name}" in setup, f".ci/setup does not install plugins/{plugin.name}"
