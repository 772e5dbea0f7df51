"""Source rules of the compiled edge's modules (gateway/edge/twin.py's MODULES), checked with ``ast``.

mypyc reads a module-level name that is not ``Final`` through the module's dict on every use (a hash
lookup); a ``Final`` one is a C static, or an inlined literal. The edge's hot path reads about 25 of them
per request, so every module constant there is ``Final``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from gateway.edge.twin import EDGE_DIR, MODULES

CONSTANT = re.compile(r"_?[A-Z][A-Z0-9_]*")


def _is_final(annotation: ast.expr) -> bool:
    target = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return isinstance(target, ast.Name) and target.id == "Final"


def constants_not_final(path: Path) -> list[str]:
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            found += [f"{path.name}:{node.lineno} {name}" for name in names if CONSTANT.fullmatch(name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if CONSTANT.fullmatch(node.target.id) and not _is_final(node.annotation):
                found.append(f"{path.name}:{node.lineno} {node.target.id}")
    return found


@pytest.mark.parametrize("module", [*MODULES, "http1"])
def test_module_constants_of_the_compiled_edge_are_final(module: str) -> None:
    assert constants_not_final(EDGE_DIR / f"{module}.py") == []


def test_the_rule_sees_a_constant_that_is_not_final(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import Final\nA: Final = 1\nB = 2\n_C: int = 3\nD: Final[int] = 4\nlow = 5\n"
    )
    assert constants_not_final(source) == ["m.py:3 B", "m.py:4 _C"]
