"""Which edge runs: the compiled twin (gateway._edgec, built by setup.py with mypyc) or these modules.

Both are the same sources (gateway/edge/twin.py). ``auto`` takes the compiled twin when it is built
and matches the sources, else the pure-Python modules; ``compiled`` insists on it (a clear error when
it is missing or stale); ``pure`` never uses it. Both can be loaded in one process, so the tests run
every edge test against each.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from gateway.config import EDGE_IMPLEMENTATIONS, ConfigError
from gateway.edge import twin

CHOICES = EDGE_IMPLEMENTATIONS


@dataclass(frozen=True)
class EdgeImpl:
    """One edge's modules, by the names of gateway/edge's."""

    name: str  # "compiled" or "pure"
    package: str

    def module(self, name: str) -> ModuleType:
        return importlib.import_module(f"{self.package}.{name}")

    def __getattr__(self, name: str) -> ModuleType:
        if name in twin.MODULES:
            return self.module(name)
        raise AttributeError(name)


PURE = EdgeImpl("pure", "gateway.edge")
COMPILED = EdgeImpl("compiled", twin.COMPILED_PACKAGE)


def compiled_problem() -> str | None:
    """Why the compiled twin cannot run, or None when it can."""
    try:
        package = importlib.import_module(twin.COMPILED_PACKAGE)
    except ImportError:
        return "not built (./dev builds it; or: python setup.py build_ext --inplace)"
    if getattr(package, "SOURCE_HASH", None) != twin.source_hash():
        return "built from other sources than gateway/edge's (stale: ./dev rebuilds it)"
    try:
        for name in (*twin.MODULES, *twin.C_MODULES):
            module = COMPILED.module(name)
            if not (module.__file__ or "").endswith(".so"):
                return f"{name} is not compiled"
    except ImportError as exc:
        return f"cannot be loaded: {exc}"
    return None


def select(choice: str = "auto") -> EdgeImpl:
    """The edge for ``choice`` (edge.implementation)."""
    if choice == "pure":
        return PURE
    problem = compiled_problem()
    if problem is None:
        return COMPILED
    if choice == "compiled":
        raise ConfigError(f"edge.implementation = compiled, but the compiled edge is {problem}")
    return PURE
