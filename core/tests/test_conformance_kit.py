"""The conformance kit needs nothing but peft-core: a method package runs it with no other method installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CORE_TESTS = Path(__file__).resolve().parent

# Every method package (and Hugging Face PEFT) is hidden, as if only peft-core and the method under test were
# installed; their entry points are still listed and fail to load, which the registry reports and survives.
CONFTEST = """
import importlib.metadata
import sys

# None in sys.modules makes an import fail and find_spec answer None, as for a package that is not installed.
for entry_point in importlib.metadata.entry_points(group="peft_core"):
    sys.modules[entry_point.value.split(".")[0]] = None
sys.modules["peft"] = None
"""

TESTS = """
import scale_method
from peft_core.plugins import registry
from peft_core.testing.conformance import ATTENTION_TARGETS, TASK_TYPES, MethodConformance

registry().register(scale_method, name="scale-method")


class TestScaleMethodConforms(MethodConformance):
    models = ("llama",)
    bad_configs = [(lambda: scale_method.ScaleConfig(target_modules=5), "target_modules")]

    def config(self, kind):
        return scale_method.ScaleConfig(target_modules=ATTENTION_TARGETS[kind], task_type=TASK_TYPES[kind])


def test_no_method_package_was_imported():
    imported = [name for name, module in sys.modules.items() if module is not None]
    assert not [name for name in imported if name.startswith("peft") and not name.startswith("peft_core")]
    assert sorted(registry().methods) == ["reference", "scale"]
"""


def test_the_kit_runs_with_no_method_package(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_scale_conformance.py").write_text("import sys\n" + textwrap.dedent(TESTS))
    env = {**os.environ, "PYTHONPATH": str(CORE_TESTS), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout
