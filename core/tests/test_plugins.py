"""Discovery through entry points, validation of plugins, and the light import of the core."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import peft_core
import pluggy
import pytest
from peft_core import Method, PluginError, hookimpl
from peft_core.plugins import PluginRegistry, registry

REPO = Path(__file__).resolve().parents[2]
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]


def test_installed_lora_distribution_is_discovered():
    lora = next(m for m in peft_core.methods() if m.name == "lora")
    assert (lora.peft_type, lora.package, lora.version) == ("LORA", "peft-lora", "0.1.0")
    assert lora.config_class.__name__ == "LoraConfig"


def _write_wheel(directory: Path, dist: str, module: str, source: str, entry_point_target: str) -> Path:
    """A minimal but real wheel: a module plus dist-info declaring a ``peft_core`` entry point."""
    version = "1.2.3"
    wheel = directory / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    info = f"{dist.replace('-', '_')}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{module}.py", textwrap.dedent(source))
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/entry_points.txt", f"[peft_core]\n{module} = {entry_point_target}\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


DUMMY_PLUGIN = """
    from dataclasses import dataclass
    from typing import ClassVar
    from peft_core import Method, hookimpl
    from peft_core.config import LayerConfig

    @dataclass
    class DummyConfig(LayerConfig):
        PEFT_TYPE: ClassVar[str] = "DUMMY_METHOD"

    @hookimpl
    def peft_register_methods(register):
        register(Method(name="dummy", peft_type="DUMMY_METHOD", config_class=DummyConfig))
"""


@pytest.fixture
def pip_target(tmp_path, monkeypatch):
    """Installs wheels with pip into a directory on sys.path; the registry is rebuilt around the test."""
    site = tmp_path / "site"

    def install(wheel: Path) -> None:
        subprocess.run(
            [*PIP_INSTALL, "--target", str(site), str(wheel)], check=True,
        )

    monkeypatch.syspath_prepend(str(site))
    peft_core.reset_registry()
    yield install
    peft_core.reset_registry()


def test_distribution_installed_by_the_test_is_discovered(tmp_path, pip_target):
    pip_target(_write_wheel(tmp_path, "peft-dummy", "peft_dummy", DUMMY_PLUGIN, "peft_dummy"))
    dummy = next(m for m in peft_core.methods() if m.name == "dummy")
    assert (dummy.package, dummy.version, dummy.peft_type) == ("peft-dummy", "1.2.3", "DUMMY_METHOD")
    assert "lora" in {m.name for m in peft_core.methods()}


def test_broken_plugin_is_reported_and_others_still_load(tmp_path, pip_target):
    pip_target(_write_wheel(tmp_path, "peft-broken", "peft_broken", "raise ImportError('boom')\n", "peft_broken"))
    assert "lora" in {m.name for m in peft_core.methods()}
    assert any("boom" in why and "peft-broken" in name for name, why in peft_core.broken_plugins().items())


def test_broken_plugin_is_listed_by_methods_with_its_reason(tmp_path, pip_target):
    pip_target(_write_wheel(tmp_path, "peft-broken", "peft_broken", "raise ImportError('boom')\n", "peft_broken"))
    broken = [m for m in peft_core.methods() if m.broken]
    assert [(m.name, m.package, m.version) for m in broken] == [("peft_broken", "peft-broken", "1.2.3")]
    assert "ImportError: boom" in broken[0].broken
    assert next(m for m in peft_core.methods() if m.name == "lora").broken is None


def test_plugin_for_another_api_version_is_refused_naming_its_distribution(tmp_path, pip_target):
    source = "PEFT_CORE_API = 2\n" + textwrap.dedent(DUMMY_PLUGIN)
    pip_target(_write_wheel(tmp_path, "peft-future", "peft_future", source, "peft_future"))
    refused = next(m for m in peft_core.methods() if m.package == "peft-future")
    assert "peft-future is written for version 2 of peft-core's plugin API" in refused.broken
    assert "provides version 1" in refused.broken
    assert "dummy" not in {m.name for m in peft_core.methods()}  # its method was not registered
    assert "lora" in {m.name for m in peft_core.methods()}


def test_plugin_declaring_the_current_api_version_loads(tmp_path, pip_target):
    source = "PEFT_CORE_API = 1\n" + textwrap.dedent(DUMMY_PLUGIN)
    pip_target(_write_wheel(tmp_path, "peft-current", "peft_current", source, "peft_current"))
    assert next(m for m in peft_core.methods() if m.name == "dummy").broken is None


def test_our_plugins_declare_the_api_version():
    import importlib

    for method in peft_core.methods():
        if method.package and method.package.startswith("peft-") and method.broken is None:
            module = importlib.import_module(method.config_class.__module__.split(".")[0] + ".plugin")
            assert module.PEFT_CORE_API == peft_core.plugins.API_VERSION, method.package


def test_duplicate_method_name_is_refused_naming_both_packages():
    fresh = PluginRegistry()

    class First:
        @hookimpl
        def peft_register_methods(self, register):
            register(Method(name="twin", peft_type="TWIN_A", config_class=object))

    class Second:
        @hookimpl
        def peft_register_methods(self, register):
            register(Method(name="twin", peft_type="TWIN_B", config_class=object))

    fresh.register(First(), package="peft-first")
    with pytest.raises(PluginError, match=r"peft-second.*'twin'.*peft-first already registered"):
        fresh.register(Second(), package="peft-second")
    assert fresh.methods["twin"].package == "peft-first"
    assert not fresh.manager.is_registered(Second)


def test_unknown_hook_is_refused():
    class Typo:
        @hookimpl
        def peft_injekt(self, model, config, adapter_name):
            return []

    with pytest.raises(PluginError, match="peft_injekt.*does not define"):
        PluginRegistry().register(Typo(), package="peft-typo")


def test_hook_with_unknown_argument_is_refused():
    class Wrong:
        @hookimpl
        def peft_inject(self, model, config, adapter_name, colour):
            return []

    with pytest.raises(PluginError, match="peft-wrong is invalid"):
        PluginRegistry().register(Wrong(), package="peft-wrong")


def test_missing_plugin_for_peft_type_names_the_package():
    with pytest.raises(PluginError, match="pip install peft-loha"):
        registry().method_for_peft_type("LOHA")


def test_every_hookspec_is_documented():
    from peft_core import hookspecs

    specs = [getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("peft_")]
    assert {s.__name__ for s in specs} >= {
        "peft_register_methods", "peft_inject", "peft_forward", "peft_merge", "peft_unmerge",
        "peft_state_dict", "peft_quantize",
    }
    for spec in specs:
        doc = spec.__doc__ or ""
        assert "Called" in doc and ("Return" in doc or "register(" in doc), spec.__name__


def test_hooks_are_called_with_keywords_only():
    # pluggy refuses positional calls: the core must always call hooks by keyword.
    with pytest.raises(TypeError):
        registry().hook.peft_inject(None, None, "x")


def _build_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True,
    )
    return next(out.glob("*.whl"))


def test_core_alone_knows_no_methods_and_imports_light(tmp_path):
    """``pip install peft-core`` alone: methods() is empty and neither torch nor transformers loads."""
    core_site, lora_site = tmp_path / "core", tmp_path / "lora"
    for source, site in ((REPO / "core", core_site), (REPO / "plugins" / "lora", lora_site)):
        wheel = _build_wheel(source, tmp_path / f"wheels-{site.name}")
        subprocess.run(
            [*PIP_INSTALL, "--target", str(site), str(wheel)], check=True,
        )
    pluggy_dir = str(Path(pluggy.__file__).parents[1])
    probe = (
        "import sys; sys.path[:0] = {paths!r}; import peft_core; "
        "print(sorted(m.name for m in peft_core.methods() if m.broken is None), 'torch' in sys.modules, "
        "'transformers' in sys.modules)"
    )

    def run(paths: list[str]) -> str:
        # -S: no site-packages, so only the directories named here are importable.
        done = subprocess.run([sys.executable, "-S", "-c", probe.format(paths=paths)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run([str(core_site), pluggy_dir]) == "[] False False"
    assert run([str(core_site), str(lora_site), pluggy_dir]) == "['lora'] False False"
