"""The package's floors: each imports only the floors below it (ast, no import is run).

  data, models  ->  fl  ->  provenance  ->  experiment
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tracefl_jax"
# Floor of each sub-package; a module may import its own floor and those below.
FLOORS = {"data": 1, "models": 1, "fl": 2, "provenance": 3, "experiment": 4}


def _imports(path: Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return {n for n in names if n.startswith("tracefl_jax.")}


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_no_import_runs_up_a_floor(package):
  up = []
  for path in sorted((PACKAGE / package).rglob("*.py")):
    for name in _imports(path):
      target = name.split(".")[1]
      if target in FLOORS and FLOORS[target] > FLOORS[package]:
        up.append(f"{path.relative_to(PACKAGE)} imports {name}")
  assert not up, "imports that run up a floor:\n" + "\n".join(up)
