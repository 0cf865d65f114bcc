"""Imports between our packages run one way, all under the servegraph namespace: models (config
schema, model building, placement) <- deployments <- graphs; autoscale reads models only; bench
and tests may use everything.

A deployment that imported graphs would tie a stage to how graphs are wired, and the two
packages could no longer be read, tested or replaced one at a time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = frozenset({"models", "deployments", "graphs", "autoscale", "bench", "tests"})
ALLOWED = {
    "models": {"models"},
    "autoscale": {"models", "autoscale"},
    "deployments": {"models", "deployments"},
    "graphs": {"models", "deployments", "autoscale", "graphs"},
    "bench": {"models", "deployments", "autoscale", "graphs", "bench"},
}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def our_imports(path: Path) -> set[str]:
    """The packages of ours a module imports (servegraph.<package>)."""
    parts = (name.split(".") for name in imported_modules(path))
    return {part[1] for part in parts if part[0] == "servegraph" and len(part) > 1} & OURS


BARE_NAME_IN_TEXT = re.compile(
    r"\b(?:import|from) (?:deployments|graphs|models|autoscale|bench)\b|-m (?:bench|graphs)\."
)


def our_modules() -> list[Path]:
    return sorted(path for package in OURS for path in (ROOT / package).rglob("*.py"))


def test_our_packages_are_imported_under_the_servegraph_namespace():
    """Installed, they exist only as servegraph.*: a top-level `models` would be some other package's.

    Code in strings (run by child processes, `python -m`) counts too."""
    bare = {
        str(path.relative_to(ROOT)): sorted(
            {name for name in imported_modules(path) if name.split(".")[0] in OURS - {"tests"}}
            | {match.group(0) for match in BARE_NAME_IN_TEXT.finditer(path.read_text())}
        )
        for path in our_modules()
        if path.name != "test_layout.py"  # its own patterns
    }
    assert {module: names for module, names in bare.items() if names} == {}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_packages_below_it(package):
    wrong = {
        str(path.relative_to(ROOT)): sorted(our_imports(path) - ALLOWED[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {module: packages for module, packages in wrong.items() if packages} == {}


def test_the_config_schema_imports_nothing_of_ours_but_itself():
    for name in ("spec.py", "config.py"):
        assert our_imports(ROOT / "models" / name) <= {"models"}
    assert our_imports(ROOT / "models" / "spec.py") == set()
