"""Dependencies point one way: core <- stores, stages <- net <- app <- cli (see STYLE.md)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "resilient_ambassador"
FORBIDDEN = {
    "core": (
        "resilient_ambassador.stages",
        "resilient_ambassador.stores",
        "resilient_ambassador.net",
        "resilient_ambassador.app",
        "resilient_ambassador.cli",
        "resilient_ambassador.secrets",
        "resilient_ambassador.config_loader",
    ),
    "stores": (
        "resilient_ambassador.stages",
        "resilient_ambassador.net",
        "resilient_ambassador.app",
        "resilient_ambassador.cli",
    ),
    "stages": ("resilient_ambassador.net", "resilient_ambassador.app", "resilient_ambassador.cli"),
    "net": ("resilient_ambassador.app", "resilient_ambassador.cli"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer: str) -> None:
    for path in (PACKAGE / layer).rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith(FORBIDDEN[layer]), f"{path.name} imports {name}"


def test_core_is_stdlib_only() -> None:
    for path in (PACKAGE / "core").rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top == "resilient_ambassador" or top in sys.stdlib_module_names, f"{path.name}: {name}"
