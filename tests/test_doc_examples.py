"""Every python example in the docs and the README runs as written, so the docs never drift from the code.

Pages whose examples need a service run them in their own tests, from the same markdown: the Hub page
against a local Hub server (tests/test_hub.py), the diffusers page (tests/test_diffusers.py), and the
distributed page, whose code is the worker that tests/test_distributed.py launches with torchrun.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_ELSEWHERE = {"hub.md", "diffusers.md", "distributed.md"}
# Each distribution's README is its page on PyPI; its example runs too.
DISTRIBUTION_READMES = [
    REPO / "core" / "README.md",
    *sorted((REPO / "plugins").glob("*/README.md")),
    REPO / "examples" / "peft-bitfit" / "README.md",
]
PAGES = [
    page for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *DISTRIBUTION_READMES]
    if page.name not in RUN_ELSEWHERE
]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_python_example_runs(page: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write relative paths write here
    namespace: dict = {"__name__": "__doc_example__"}
    for block in python_blocks(page):  # in order, sharing names, as a reader runs them
        exec(compile(block, str(page), "exec"), namespace)  # our own docs, run as a test


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess:
    # Not -q: mkdocs counts the warnings it logs, and -q logs none, so --strict would never fail.
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, cwd=REPO,
    )


def plugin_public_names() -> list[str]:
    """``module.qualname`` of every name a plugin exports (``__all__``), where it is defined."""
    import importlib

    names = []
    for init in sorted((REPO / "plugins").glob("*/src/*/__init__.py")):
        package = importlib.import_module(init.parent.name)
        for name in package.__all__:
            value = getattr(package, name)
            names.append(f"{value.__module__}.{value.__qualname__}")
    return names


def test_the_documentation_site_builds_strictly(tmp_path) -> None:
    done = build_site(REPO / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert api.count("get_peft_model") >= 1
    missing = [name for name in plugin_public_names() if f'id="{name}"' not in api]
    assert not missing, f"docs/api.md documents none of: {missing} (add a '::: <name>' line per name)"


def test_the_site_links_only_to_its_own_pages(tmp_path) -> None:
    """A relative link to a file outside docs/ works on GitHub but is a dead link on the site."""
    config = tmp_path / "mkdocs.yml"
    config.write_text(
        f"INHERIT: {REPO / 'mkdocs.yml'}\ndocs_dir: {REPO / 'docs'}\n"
        "validation:\n  links:\n    unrecognized_links: warn\n"
    )
    done = build_site(config, tmp_path / "site")
    assert done.returncode == 0, done.stderr
