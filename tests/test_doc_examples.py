"""The code examples of the integration docs run as written, so the docs never drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
# Pages whose examples run as they are; others run theirs in their own tests (a local Hub server, torchrun).
PAGES = [DOCS / "integrations" / "transformers.md", DOCS / "integrations" / "accelerate.md"]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_every_python_example_runs(page: Path) -> None:
    blocks = python_blocks(page)
    assert blocks, f"{page.name} has no python example"
    for block in blocks:
        namespace: dict = {"__name__": f"docs.{page.stem}"}
        exec(compile(block, str(page), "exec"), namespace)
