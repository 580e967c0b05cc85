"""The repository's promises about itself: CI runs the README's test command."""

from __future__ import annotations

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


def test_the_core_never_names_a_plugin():
    core = REPO / "core" / "src" / "peft_core"
    for source in core.rglob("*.py"):
        text = source.read_text()
        for plugin in (REPO / "plugins").iterdir():
            module = "peft_" + plugin.name.replace("-", "_")
            assert module not in text, f"{source} names {module}"


def test_ci_installs_every_plugin():
    setup = (REPO / ".ci" / "setup").read_text()
    for plugin in (REPO / "plugins").iterdir():
        assert f"-e ./plugins/{plugin.name}" in setup, f".ci/setup does not install plugins/{plugin.name}"
