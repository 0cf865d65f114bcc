"""Imports between our packages run one way: models (config schema, model building, placement)
<- deployments <- graphs; autoscale reads models only; bench and tests may use everything.

A deployment that imported graphs would tie a stage to how graphs are wired, and the two
packages could no longer be read, tested or replaced one at a time.
"""

from __future__ import annotations

import ast
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


def our_imports(path: Path) -> set[str]:
    """The packages of ours a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


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
