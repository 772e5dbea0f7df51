"""The names a test module took from gateway.edge, looked up again in one edge (compiled or pure).

The twins are the same sources (gateway/edge/twin.py), so every class, function and module the
pure-Python edge has, the compiled one has under the same name; constants are equal in both."""

from __future__ import annotations

import dataclasses
import inspect
from types import ModuleType
from typing import Any

from gateway.edge import twin
from gateway.edge.impl import COMPILED, PURE, EdgeImpl

_PACKAGES = (PURE.package + ".", COMPILED.package + ".")


def _edge_module(value: Any) -> str | None:
    """The gateway/edge module (its short name) a class, function or module comes from, if any."""
    if isinstance(value, ModuleType):
        where = value.__name__
    elif isinstance(value, type) or inspect.isroutine(value):
        where = value.__module__
    else:
        return None  # an instance (or a constant): the same in both, or made by the test
    if not isinstance(where, str):
        return None
    for package in _PACKAGES:
        if where.startswith(package) and where[len(package) :] in twin.MODULES:
            return where[len(package) :]
    return None


def _twin_value(value: Any, edge: EdgeImpl) -> Any:
    """An instance of an edge dataclass (a test's module-level config or route, or a parameter) made
    again of ``edge``'s class, field by field, also inside tuples and lists; anything else as it is."""
    if type(value) in (tuple, list):
        items = [_twin_value(item, edge) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else type(value)(items)
    cls = type(value)
    short = _edge_module(cls)
    if short is None or not dataclasses.is_dataclass(value):
        return value
    twin_cls = getattr(edge.module(short), cls.__name__)
    fields = {f.name: _twin_value(getattr(value, f.name), edge) for f in dataclasses.fields(value) if f.init}
    return twin_cls(**fields)


def twin_names(namespace: dict[str, Any], edge: EdgeImpl) -> dict[str, Any]:
    """Each name in ``namespace`` bound to an edge module, class or function, or to an instance of an
    edge dataclass: the same in ``edge``."""
    found = {}
    for name, value in namespace.items():
        if name.startswith("__"):
            continue
        short = _edge_module(value)
        if short is None:
            twin = _twin_value(value, edge)
            if twin is not value:
                found[name] = twin
        elif isinstance(value, ModuleType):
            found[name] = edge.module(short)
        else:
            found[name] = getattr(edge.module(short), value.__name__)
    return found


def twin_arguments(arguments: dict[str, Any], edge: EdgeImpl) -> None:
    """A test's parametrised arguments made of ``edge``'s classes (built when the module was read)."""
    for name, value in arguments.items():
        arguments[name] = _twin_value(value, edge)
