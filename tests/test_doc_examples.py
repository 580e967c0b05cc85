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
PAGES = [
    page for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
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


def test_the_documentation_site_builds_strictly(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(REPO / "mkdocs.yml"), "-d",
         str(tmp_path / "site")],
        capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("get_peft_model") >= 1
