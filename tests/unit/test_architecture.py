"""Architecture rules that keep the engine usable without Airflow.

``d365sync.engine``, ``d365sync.dynamics``, ``d365sync.erp`` and ``d365sync.sandbox`` must never
import Airflow, not even lazily inside a function: hooks in ``d365sync.airflow`` only turn an
Airflow connection into one of these clients.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "include" / "d365sync"
AIRFLOW_FREE = ("engine", "dynamics", "erp", "sandbox")


def _python_files(area: str) -> list[Path]:
    return sorted((PACKAGE / area).rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("area", AIRFLOW_FREE)
def test_area_source_never_imports_airflow(area: str) -> None:
    files = _python_files(area)
    assert files, f"d365sync.{area} has no modules"
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            m for m in _imported_modules(path) if m.split(".")[0] == "airflow"
        )
        for path in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_clients_loads_no_airflow_module() -> None:
    modules = [f"d365sync.{area}" for area in AIRFLOW_FREE] + ["d365sync.cli"]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
