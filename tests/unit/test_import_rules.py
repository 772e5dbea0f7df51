"""The dependency rules of DESIGN.md and issue 18, checked on the source with ``ast`` (no imports run).

- The edge imports from the state package only its protocols and event types (``gateway.state.ports``,
  ``gateway.state.events``), and never loads the Redis store, even through another module.
- The API imports nothing from the edge or the state package: it goes through the orchestrator.
- Nothing imports the API but the composition root.
- Pure modules import no asyncio, aiohttp or redis.
- The volume store (``gateway.volumes``) loads nothing of the state, the API, the orchestrator or the planes.
- No import cycle between gateway's modules.

Only imports that run when a module loads count: those under ``if TYPE_CHECKING:`` and inside functions
(deliberately lazy ones) are left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gateway"

PORTS = {"gateway.state.ports", "gateway.state.events"}
EDGE_MAY_USE_FROM_STATE = {"gateway.state", *PORTS}
# What the edge must never load, directly or not: Redis and the modules that talk to it.
NEVER_UNDER_EDGE = ("gateway.state.store", "gateway.state.connection", "gateway.state.bus", "redis")
API_IMPORTERS = {"gateway.app"}
PURE = [
    "gateway.ids",
    "gateway.tokens",
    "gateway.state.records",
    "gateway.state.keyspace",
    "gateway.state.events",
    "gateway.state.redis_url",
    "gateway.edge.target",
    "gateway.edge.headers",
    "gateway.edge.access",
    "gateway.edge.signed",
    "gateway.orchestrator.drivers.cpu_times",
    "gateway.egress.policy",
    "gateway.egress.sni",
    "gateway.egress.resolved",
    "gateway.egress.inject",
    "gateway.egress.http_head",
    "gateway.orchestrator.drivers.mount_paths",
    "gateway.orchestrator.vault_rules",
    "gateway.orchestrator.idle",
    "gateway.egress.ca",
    "gateway.volumes.paths",
]
IMPURE_LIBRARIES = ("asyncio", "aiohttp", "redis", "uvloop", "httptools")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _load_time_nodes(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run at import: the module body, into if/try/with blocks, not into functions."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _load_time_nodes(node.body)
            yield from _load_time_nodes(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _load_time_nodes(block)
        elif isinstance(node, ast.With):
            yield from _load_time_nodes(node.body)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports when it loads (``from a import b`` counts as ``a`` and ``a.b``)."""
    found: set[str] = set()
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _load_time_nodes(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


GRAPH: dict[str, set[str]] = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def gateway_imports(module: str) -> set[str]:
    """The gateway modules ``module`` loads (``from pkg import name`` of a non-module name is ``pkg``)."""
    return {target for target in GRAPH[module] if target in GRAPH}


def closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for target in GRAPH.get(current, set()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_was_read() -> None:
    assert "gateway.edge.resolver" in GRAPH and "gateway.state.ports" in GRAPH
    assert "gateway.state.ports" in gateway_imports("gateway.edge.resolver")


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if in_package(m, "gateway.edge")))
def test_the_edge_uses_only_the_state_protocols_and_events(module: str) -> None:
    direct = {m for m in GRAPH[module] if in_package(m, "gateway.state")}
    # ``from gateway.state.ports import RouteSource`` reads as the module and ``...ports.RouteSource``.
    bad = {m for m in direct if m not in EDGE_MAY_USE_FROM_STATE and m.rpartition(".")[0] not in PORTS}
    assert not bad, f"{module} imports {sorted(bad)} from the state package"
    loaded = {m for m in closure(module) if any(in_package(m, p) for p in NEVER_UNDER_EDGE)}
    assert not loaded, f"{module} loads {sorted(loaded)}"
    for other in ("gateway.api", "gateway.orchestrator", "gateway.keys"):
        assert not any(in_package(m, other) for m in GRAPH[module]), f"{module} imports {other}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if in_package(m, "gateway.egress")))
def test_the_egress_plane_uses_only_the_state_protocols_and_no_other_plane(module: str) -> None:
    """A plane of its own (DESIGN.md): its policy source is a protocol; it knows nothing of the API, the
    orchestrator or the edge."""
    direct = {m for m in GRAPH[module] if in_package(m, "gateway.state")}
    bad = {m for m in direct if m not in EDGE_MAY_USE_FROM_STATE and m.rpartition(".")[0] not in PORTS}
    assert not bad, f"{module} imports {sorted(bad)} from the state package"
    loaded = {m for m in closure(module) if any(in_package(m, p) for p in NEVER_UNDER_EDGE)}
    assert not loaded, f"{module} loads {sorted(loaded)}"
    for other in ("gateway.api", "gateway.orchestrator", "gateway.edge", "gateway.keys"):
        assert not any(in_package(m, other) for m in GRAPH[module]), f"{module} imports {other}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if in_package(m, "gateway.api")))
def test_the_api_goes_through_the_orchestrator(module: str) -> None:
    bad = {m for m in GRAPH[module] if in_package(m, "gateway.state") or in_package(m, "gateway.edge")}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if in_package(m, "gateway.volumes")))
def test_the_volume_store_knows_nothing_of_the_planes_or_the_state(module: str) -> None:
    """The bytes of volumes (issue 21): the orchestrator holds the records and asks the store; the store
    knows nothing of Redis, the API, the orchestrator, the drivers or the planes."""
    for other in ("gateway.api", "gateway.orchestrator", "gateway.edge", "gateway.egress", "gateway.state"):
        assert not any(in_package(m, other) for m in closure(module)), f"{module} loads {other}"
    assert "redis" not in {t.partition(".")[0] for t in closure(module)}


def test_nothing_but_the_composition_root_imports_the_api() -> None:
    importers = {
        m for m, targets in GRAPH.items() if not in_package(m, "gateway.api") for t in targets
        if in_package(t, "gateway.api")
    }  # fmt: skip
    assert importers <= API_IMPORTERS


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_no_io(module: str) -> None:
    libraries = {t.partition(".")[0] for t in closure(module) if not t.startswith("gateway")}
    assert not libraries & set(IMPURE_LIBRARIES), (
        f"{module} loads {sorted(libraries & set(IMPURE_LIBRARIES))}"
    )


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components over gateway's modules.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in gateway_imports(node):
            if target == node.rpartition(".")[0] or target == node:
                continue  # a package's __init__ holds only a docstring: loading it is no cycle
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"
