"""The distributions as users get them from PyPI: the license and the typing marker in every wheel,
classifiers and links, a README that stands on its own, and dependencies that are exactly what the code
imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import tomllib
import trove_classifiers
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = [
    path.relative_to(REPO).as_posix()
    for path in [REPO / "core", *sorted((REPO / "plugins").iterdir()), REPO / "examples" / "peft-bitfit"]
    if (path / "pyproject.toml").is_file()
]
# Import names whose distribution is named otherwise, for when that distribution is not installed here
# (installed ones are looked up with importlib.metadata.packages_distributions()).
IMPORT_NAMES = {"yaml": "pyyaml", "huggingface_hub": "huggingface-hub", "PIL": "pillow", "sklearn": "scikit-learn"}
# Modules that are themselves part of an extra: they may import that extra's distributions at the top.
# peft_core.testing is imported by pytest (through the pytest11 entry point) and by method authors' tests;
# peft_train.trl only by PeftSFTTrainer's users.
EXTRA_MODULES = {"peft-core": {"peft_core.testing": "testing"}, "peft-train": {"peft_train.trl": "trl"}}
# Dependencies declared for a library the code uses that fails to declare them itself.
NOT_IMPORTED = {"peft-train": {"accelerate"}}  # transformers' Trainer imports it but does not require it
# Extras for running a package's own tests: their requirements are imported by the tests, not the package.
TEST_EXTRAS = {"test"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Distribution:
    directory: Path
    project: dict

    @property
    def name(self) -> str:
        return normalized(self.project["name"])

    @property
    def package(self) -> str:
        """The import name of its one package (``src/peft_lora`` -> ``peft_lora``)."""
        [path] = self.toml["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
        return Path(path).name

    @property
    def toml(self) -> dict:
        return tomllib.loads((self.directory / "pyproject.toml").read_text())

    def requirements(self) -> dict[str, set[str]]:
        """Declared distribution names by where they are declared: ``""`` for dependencies, else the extra."""
        groups = {"": self.project.get("dependencies", []), **self.project.get("optional-dependencies", {})}
        return {group: {normalized(Requirement(r).name) for r in reqs} for group, reqs in groups.items()}


def distribution(directory: str) -> Distribution:
    path = REPO / directory
    return Distribution(path, tomllib.loads((path / "pyproject.toml").read_text())["project"])


@cache
def site_url() -> str:
    match = re.search(r"^site_url: (\S+)$", (REPO / "mkdocs.yml").read_text(), re.MULTILINE)
    assert match, "mkdocs.yml sets no site_url"
    return match.group(1)


# --- what every wheel holds ----------------------------------------------------------------------------


def build_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True,
    )
    return next(out.glob("*.whl"))


@pytest.mark.parametrize("directory", ["core", "plugins/lora"])
def test_the_wheel_holds_the_license_and_the_typing_marker(directory: str, tmp_path: Path) -> None:
    dist = distribution(directory)
    with zipfile.ZipFile(build_wheel(dist.directory, tmp_path)) as wheel:
        names = set(wheel.namelist())
        [info] = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
        assert f"{dist.package}/py.typed" in names
        assert wheel.read(f"{info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
        metadata = wheel.read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    assert f"Project-URL: Documentation, {site_url()}" in metadata


def test_every_distribution_has_the_license_and_every_package_the_typing_marker() -> None:
    root = (REPO / "LICENSE").read_text()
    assert root.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in root
    for directory in DISTRIBUTIONS:
        dist = distribution(directory)
        # A copy per distribution: a wheel's license files must lie inside the project's own folder.
        assert (dist.directory / "LICENSE").read_text() == root, f"{directory}/LICENSE differs from ./LICENSE"
        assert dist.project.get("license-files") == ["LICENSE"], directory
        assert dist.project.get("license") == "Apache-2.0", directory
        assert (dist.directory / "src" / dist.package / "py.typed").is_file(), f"{directory} has no py.typed"


# --- what PyPI shows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", DISTRIBUTIONS)
def test_the_pypi_page_has_classifiers_links_and_a_readme_of_its_own(directory: str) -> None:
    dist = distribution(directory)
    classifiers = dist.project.get("classifiers", [])
    assert "Typing :: Typed" in classifiers and any(c.startswith("Development Status ::") for c in classifiers)
    assert not set(classifiers) - trove_classifiers.classifiers, "unknown classifiers"
    urls = dist.project.get("urls", {})
    documentation = urls.get("Documentation", "")
    assert documentation.startswith(site_url()), f"Documentation should be a page of the site, {site_url()}"
    page = documentation.removeprefix(site_url()).strip("/") or "index"
    assert (REPO / "docs" / f"{page}.md").is_file(), f"{documentation} is no page of docs/"

    readme = (dist.directory / dist.project["readme"]).read_text()
    assert readme.startswith(f"# {dist.project['name']}\n")
    assert not re.search(r"see (the|docs/)[^.]*(repository|README)", readme, re.IGNORECASE), "a pointer elsewhere"
    install = f"pip install {dist.project['name']}" if directory.startswith(("core", "plugins")) else \
        f"pip install ./core ./plugins/lora ./{directory}"  # an example package, not published
    assert install in readme
    assert re.search(r"```python\n.*\n```", readme, re.DOTALL), "no example (tests/test_doc_examples.py runs it)"
    assert documentation in readme, "the README links to its docs page"
    assert not re.search(r"\]\((?!https?://|#)", readme), "relative links break on PyPI"


# --- dependencies ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    module: str  # the top-level name: "safetensors" for `from safetensors.torch import load_file`
    where: str  # "peft_core/hub.py:104"
    lazy: bool  # inside a function, or guarded by `except ImportError`: run only when that code runs


def imports(source: Path, root: Path) -> list[Import]:
    """Every absolute import of a module, outside ``if TYPE_CHECKING:`` blocks."""
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, lazy)
            return  # what type checkers read: no import at run time
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if node.level == 0 and node.module else []
            where = f"{source.relative_to(root).as_posix()}:{node.lineno}"
            found.extend(Import(name.split(".")[0], where, lazy) for name in names)
        guarded = isinstance(node, ast.Try) and any(
            handler.type is not None and "ImportError" in ast.unparse(handler.type) for handler in node.handlers
        )
        inner = lazy or guarded or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source.read_text()), lazy=False)
    return found


@cache
def repository_packages() -> dict[str, str]:
    """Import name -> distribution name, for this repository's distributions (editable installs are not in
    packages_distributions())."""
    found = {}
    for pyproject in [REPO / "core" / "pyproject.toml", *REPO.glob("plugins/*/pyproject.toml"),
                      *REPO.glob("examples/*/pyproject.toml")]:
        dist = distribution(pyproject.parent.relative_to(REPO).as_posix())
        found[dist.package] = dist.name
    return found


def providers(module: str) -> set[str]:
    """The distributions that provide the top-level module ``module``."""
    if module in repository_packages():
        return {repository_packages()[module]}
    installed = importlib.metadata.packages_distributions().get(module)
    if installed:
        return {normalized(name) for name in installed}
    return {normalized(IMPORT_NAMES.get(module, module))}


@pytest.mark.parametrize("directory", DISTRIBUTIONS)
def test_declared_dependencies_are_exactly_what_the_code_imports(directory: str) -> None:
    dist = distribution(directory)
    declared = dist.requirements()
    package_root = dist.directory / "src"
    problems, used = [], set()
    for source in sorted((package_root / dist.package).rglob("*.py")):
        module_name = ".".join(source.relative_to(package_root).with_suffix("").parts)
        module_extras = {extra for prefix, extra in EXTRA_MODULES.get(dist.name, {}).items()
                         if module_name == prefix or module_name.startswith(prefix + ".")}
        for found in imports(source, package_root):
            if found.module in sys.stdlib_module_names or found.module == dist.package:
                continue
            names = providers(found.module)
            used |= names
            groups = {group for group, reqs in declared.items() if names & reqs}
            if not groups:
                problems.append(f"{found.where} imports {found.module}, which {dist.name} does not declare "
                                f"(add {' or '.join(sorted(names))} to its dependencies, or to an extra if lazy)")
            elif "" not in groups and not found.lazy and not groups & module_extras:
                problems.append(f"{found.where} imports {found.module} when the module loads, but it is only in "
                                f"the extra(s) {sorted(groups)}: import it inside the function that needs it")
    for group, reqs in declared.items():
        if group in TEST_EXTRAS:
            continue
        for unused in sorted(reqs - used - NOT_IMPORTED.get(dist.name, set())):
            where = "dependencies" if not group else f"the extra {group!r}"
            problems.append(f"{dist.name} declares {unused} in {where}, but its code never imports it")
    assert not problems, "\n".join(problems)


def test_the_import_walk_sees_lazy_guarded_and_type_only_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import os\nimport yaml.constructor\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
        "try:\n    import bitsandbytes\nexcept ImportError:\n    bitsandbytes = None\n"
        "def f():\n    from safetensors.torch import load_file\nfrom . import sibling\n"
    )
    assert [(i.module, i.lazy) for i in imports(source, tmp_path)] == [
        ("os", False), ("yaml", False), ("typing", False), ("bitsandbytes", True), ("safetensors", True),
    ]
    assert providers("yaml") == {"pyyaml"} and providers("peft_lora") == {"peft-lora"}
