"""Fixtures shared by every test: a real redis-server, and a whole gateway on a free loopback port.

The redis-server is the project's own EmbeddedRedis (the one ``gateway serve`` starts), once per test
session on a unix socket, flushed before each test. VM drivers under test use their own CIDRs and
name prefixes, so a developer's running gateway is never touched.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis

from gateway.app import Services, running_gateway
from gateway.config import Config, load_config, override
from gateway.edge import impl as edge_impls
from gateway.embedded_redis import EmbeddedRedis
from gateway.errors import DriverError
from gateway.images.store import ImageStore
from gateway.orchestrator.drivers import hostfw
from gateway.orchestrator.drivers._cgroups import CgroupTree
from gateway.orchestrator.drivers.registry import make_driver
from gateway.volumes.local import LocalVolumeStore
from tests import edge_twins, event_loop
from tests.acme_env import AcmeTestEnv
from tests.qemu_env import guest_image
from tests.rootfs_env import CACHE_ROOT as ROOTFS_CACHE
from tests.rootfs_env import cached_image_store, ensure_test_images, rootfs_missing

# The hard per-test limit that keeps a stuck test from hanging the run (issue 17.8): its hooks, made this
# conftest's own by importing them (other pytest runs load the module itself with -p tests.watchdog).
from tests.watchdog import (  # noqa: F401
    pytest_addoption,
    pytest_configure,
    pytest_runtest_protocol,
    pytest_unconfigure,
)

# A run started in the background by a non-interactive shell (`./dev test &`) has SIGINT ignored, which
# exec keeps: the VMs of gateways under test here (process driver) would ignore a terminal's Ctrl-C.
# Tests see what a gateway started from a terminal sees (`gateway serve` handles SIGINT itself).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

IS_ROOT = os.geteuid() == 0


@dataclass(frozen=True)
class HostNames:
    """What the gateways of one pytest process hold host-wide (addresses, interface and cgroup names,
    egress ports): each process running tests side by side (./dev test's xdist workers) has its own."""

    netns_cidr: str
    netns_prefix: str
    cgroup: str
    qemu_cidr: str
    qemu_prefix: str
    qemu_cgroup: str
    process_cidr: str
    egress_ports: tuple[int, int]  # proxy and resolver: the conftest's gateways
    egress_env_ports: tuple[int, int]  # the egress tests' gateways (tests/egress_env.py)


# VM addresses for tests: inside 172.16/12 but away from the 172.30/16 default of a dev gateway, and from
# the ranges test files take for themselves. ./dev test gives each worker whole files (--dist loadfile),
# so a file's own names are never in use twice at once; names several files use are per worker (these,
# and test_cli's cli_env).
SLOTS = (
    HostNames("172.31.240.0/22", "gwt", "gateway-test", "172.31.236.0/23", "gwq", "gateway-qtest",
              "127.77.0.0/22", (15001, 15053), (15901, 15953)),
    HostNames("172.31.244.0/22", "gwu", "gateway-test1", "172.31.238.0/23", "gwr", "gateway-qtest1",
              "127.77.4.0/22", (15011, 15063), (15911, 15963)),
    HostNames("172.31.248.0/22", "gwv", "gateway-test2", "172.31.234.0/23", "gws", "gateway-qtest2",
              "127.77.8.0/22", (15021, 15073), (15941, 15993)),
    HostNames("172.31.204.0/22", "gww", "gateway-test3", "172.31.216.0/23", "gwx", "gateway-qtest3",
              "127.77.12.0/22", (15031, 15083), (15961, 16013)),
)  # fmt: skip
# pytest-xdist names its workers gw0, gw1...; a run without workers is slot 0.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
SLOT = int(WORKER.removeprefix("gw") or 0)
if SLOT >= len(SLOTS):
    raise RuntimeError(f"tests/conftest.py has host names for {len(SLOTS)} test workers, not {SLOT + 1}")
HOST_NAMES = SLOTS[SLOT]
TEST_NETNS_CIDR = HOST_NAMES.netns_cidr
TEST_NETNS_PREFIX = HOST_NAMES.netns_prefix
TEST_CGROUP = HOST_NAMES.cgroup
TEST_QEMU_CIDR = HOST_NAMES.qemu_cidr
TEST_QEMU_PREFIX = HOST_NAMES.qemu_prefix
TEST_QEMU_CGROUP = HOST_NAMES.qemu_cgroup
TEST_PROCESS_CIDR = HOST_NAMES.process_cidr

# The edge every gateway under test runs (edge.implementation); ./dev test sets "compiled", so the whole
# suite runs the compiled edge (and fails when it is missing or stale).
DEFAULT_EDGE = os.environ.get("GATEWAY_TEST_EDGE", "auto")
# Tests marked both_edges run once per edge, so the two can never drift apart. Without a compiled edge
# (plain pytest before ./dev built it) its runs are skipped, unless ./dev test asked for it.
_COMPILED_MISSING = edge_impls.compiled_problem()
EDGES = [
    pytest.param(
        "compiled", id="compiled",
        marks=pytest.mark.skipif(
            _COMPILED_MISSING is not None and DEFAULT_EDGE != "compiled",
            reason=f"the compiled edge is {_COMPILED_MISSING}",
        ),
    ),
    pytest.param("pure", id="pure"),
]  # fmt: skip

DRIVERS = [
    pytest.param("process", id="process"),
    pytest.param("netns", id="netns", marks=pytest.mark.skipif(not IS_ROOT, reason="netns needs root")),
]


def _images_needed(item: pytest.Item) -> set[str]:
    """Images a collected test may run VMs on (with the netns driver), as far as its fixtures tell."""
    fixtures = set(getattr(item, "fixturenames", ()))
    uses_images = (
        fixtures & {"gateway_factory", "rootfs_images"} or "netns" in item.nodeid or "qemu" in item.nodeid
    )
    needed = {"default"} if uses_images else set()
    if "qemu" in item.nodeid and "python_data" in item.nodeid:
        needed.add("python-data")  # (the qemu test of a non-default image)
    if "test_instances.py" in item.nodeid and "netns" in item.nodeid:
        needed.add("browser")  # the browser instances' image (debian-12) runs on it
    return needed


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the images tests will need now, outside any test's timeout (about a minute each, once per
    definition: they are kept in ROOTFS_CACHE across runs). Where they cannot be built, or the build
    fails, the tests that need them fail or skip on their own."""
    if session.config.option.collectonly or rootfs_missing() is not None:
        return
    needed = set().union(*(_images_needed(item) for item in session.items))
    images = cached_image_store()
    missing = [name for name in images.names() if name in needed and not images.is_built(name)]
    if not missing:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter is not None else print
    say(f"building test images {', '.join(missing)} into {ROOTFS_CACHE} (about a minute each, once)")
    try:
        ensure_test_images(*missing)
    except DriverError as exc:
        say(f"cannot build test images: {exc}")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Tests run on the loop production runs on (``gateway serve`` uses uvloop), closed so that a handle
    a test leaves open fails that test instead of hanging the run (``tests/event_loop.py``)."""
    return {"uvloop": event_loop.new_event_loop}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that starts a gateway, and every test of a module marked both_edges, runs once on each
    edge: the whole suite passes on both."""
    marked = metafunc.definition.get_closest_marker("both_edges") is not None
    starts_gateways = "gateway_factory" in metafunc.fixturenames
    if (marked or starts_gateways) and "edge_implementation" in metafunc.fixturenames:
        metafunc.parametrize("edge_implementation", EDGES, indirect=True, scope="module")


_running_edge = DEFAULT_EDGE


def running_edge() -> str:
    """The edge of the tests running now, for gateways a test starts as processes of their own."""
    return _running_edge


@pytest.fixture(scope="module")
def edge_implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    """edge.implementation of the gateways a test starts: each edge in turn (all of a module's tests on
    one edge, then on the other) for the tests pytest_generate_tests parametrises."""
    global _running_edge
    _running_edge = str(getattr(request, "param", DEFAULT_EDGE))
    yield _running_edge
    _running_edge = DEFAULT_EDGE


@pytest.fixture(scope="module", autouse=True)
def edge_names(request: pytest.FixtureRequest, edge_implementation: str) -> Iterator[None]:
    """In a module marked both_edges, the names it imported from gateway.edge (classes, functions,
    modules) are the running edge's while its tests run: its unit tests test the compiled twin too."""
    if request.node.get_closest_marker("both_edges") is None:
        yield
        return
    namespace = request.module.__dict__
    before = dict(namespace)
    namespace.update(edge_twins.twin_names(namespace, edge_impls.select(edge_implementation)))
    yield
    namespace.update(before)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> None:
    """In a module marked both_edges, parameters that are edge objects are the running edge's."""
    if pyfuncitem.get_closest_marker("both_edges") is not None:
        implementation = pyfuncitem.funcargs.get("edge_implementation")
        if isinstance(implementation, str):
            edge_twins.twin_arguments(pyfuncitem.funcargs, edge_impls.select(implementation))


@pytest.fixture
def edge(edge_implementation: str) -> edge_impls.EdgeImpl:
    """The edge's modules (``edge.protocol.EdgeProtocol``...), for tests that drive them directly."""
    return edge_impls.select(edge_implementation)


# Ports for the listeners tests start: from this worker's own range, below the kernel's ephemeral range
# (32768 and up), so an outgoing connection of another test can never take one between the test choosing
# it and a gateway binding it (a port 0 chose could: "address already in use", seen in CI).
_PORTS_PER_WORKER = 2500
_TEST_PORTS = itertools.cycle(range(20000 + _PORTS_PER_WORKER * SLOT, 20000 + _PORTS_PER_WORKER * (SLOT + 1)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on or holds now, not handed out again soon."""
    for _ in range(_PORTS_PER_WORKER):
        port = next(_TEST_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in this worker's range of {_PORTS_PER_WORKER}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


def remove_blackhole(cidr: str) -> None:
    subprocess.run(["ip", "route", "del", "blackhole", cidr], capture_output=True, check=False)


def remove_host_firewall(prefix: str) -> None:
    """The driver keeps its nftables table on purpose (like the blackhole route); tests remove theirs."""
    subprocess.run(["nft", "-f", "-"], input=hostfw.render_remove(prefix), text=True, capture_output=True)


def remove_empty_cgroup_parents(name: str) -> None:
    """The driver keeps its parent cgroups on purpose; tests leave the host as they found it."""
    for parent in CgroupTree(CgroupTree.DEFAULT_ROOT, name).parents():
        with contextlib.suppress(OSError):
            parent.rmdir()


def make_config(tmp_path: Path, redis_url: str, driver: str, **sections: dict[str, object]) -> Config:
    port = free_port()
    base = override(
        load_config(environ={}),
        server={
            "listen": f"127.0.0.1:{port}",
            "data_dir": str(tmp_path / "data"),
            "public_url": f"http://127.0.0.1:{port}",
            "shutdown_grace_s": 2.0,
        },
        redis={"url": redis_url},
        vms={"driver": driver, "reaper_interval_s": 0.1, "boot_timeout_s": 15.0},
        netns={"cidr": TEST_NETNS_CIDR, "name_prefix": TEST_NETNS_PREFIX, "cgroup_name": TEST_CGROUP},
        # Tests run as root here: the process driver refuses root unless told (it isolates nothing).
        process={"cidr": TEST_PROCESS_CIDR, "allow_root": True},
        qemu={
            "cidr": TEST_QEMU_CIDR,
            "name_prefix": TEST_QEMU_PREFIX,
            "cgroup_name": TEST_QEMU_CGROUP,
            # Built (once per content) only when a test asks for the qemu driver.
            "image_dir": str(guest_image()) if driver == "qemu" else "",
        },
        # netns and qemu VMs run on images: the shared cache (see pytest_collection_finish); other
        # drivers' tests see the data folder's (none built).
        images={"dir": str(ROOTFS_CACHE) if driver in ("netns", "qemu") else ""},
        admin={"listen": f"127.0.0.1:{free_port()}"},
        egress={"proxy_port": HOST_NAMES.egress_ports[0], "resolver_port": HOST_NAMES.egress_ports[1]},
    )
    return override(base, **sections) if sections else base


@dataclass
class GatewayUnderTest:
    config: Config
    services: Services
    http: aiohttp.ClientSession
    api_key: str
    key_id: str
    context: contextlib.AbstractAsyncContextManager[Services]
    running: bool = True

    async def stop(self) -> None:
        """Stop the gateway as SIGTERM would: VMs keep running, their state stays in Redis."""
        if self.running:
            self.running = False
            await self.http.close()
            await self.context.__aexit__(None, None, None)

    @property
    def url(self) -> str:
        return self.config.server.public_url

    @property
    def auth(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key}

    async def new_key(self, name: str = "other") -> str:
        key, _ = await self.services.key_store.create(name)
        return key

    async def request(
        self, method: str, path: str, *, key: str | None = None, anonymous: bool = False, **kwargs: object
    ) -> tuple[int, object]:
        """Send a request with this gateway's key unless another key, own auth headers or none is asked."""
        headers = dict(kwargs.pop("headers", None) or {})  # type: ignore[arg-type]
        if key is not None:
            headers["X-API-Key"] = key
        elif not anonymous and "X-API-Key" not in headers and "Authorization" not in headers:
            headers.update(self.auth)
        async with self.http.request(method, self.url + path, headers=headers, **kwargs) as resp:  # type: ignore[arg-type]
            body = await resp.json(content_type=None) if resp.content_length != 0 else None
            return resp.status, body


async def release_volumes(data_path: Path) -> None:
    """Unmount every volume, checkpoint and pool a test's gateway mounted, and free their loop devices."""
    root = data_path / "volumes"
    if IS_ROOT and root.exists():
        await LocalVolumeStore(root).release_all()


async def destroy_all(services: Services) -> None:
    """Kill every VM this gateway knows, so no namespace, veth, cgroup or process outlives a test."""
    for vm_id in await services.store.live_vm_ids():
        rec = await services.store.get_vm(vm_id)
        if rec is not None:
            await services.orchestrator.end(rec, "killed", "test teardown")


@pytest.fixture
async def gateway_factory(tmp_path: Path, redis_url: str, edge_implementation: str) -> AsyncIterator[object]:
    """Start gateways (one per call) with a driver and config overrides; all are torn down after the test.

    Gateways share the test's data folder and Redis, so a second one started after the first stopped
    is that gateway restarted.
    """
    started: list[GatewayUnderTest] = []

    async def start(driver: str = "process", **sections: dict[str, object]) -> GatewayUnderTest:
        sections["edge"] = {"implementation": edge_implementation, **sections.get("edge", {})}
        config = make_config(tmp_path, redis_url, driver, **sections)
        context = running_gateway(config)
        services = await context.__aenter__()
        key, rec = await services.key_store.create("test")
        gw = GatewayUnderTest(config, services, aiohttp.ClientSession(), key, rec.key_id, context)
        started.append(gw)
        return gw

    try:
        yield start
    finally:
        for gw in reversed(started):
            if gw.running:
                await destroy_all(gw.services)
                await gw.stop()
        # Whatever a failed test left behind (e.g. VMs of a gateway it stopped): swept by slot prefix.
        for config in {gw.config.vms.driver: gw.config for gw in started}.values():
            await make_driver(config).sweep(set())
        # Volumes' mounts and loop devices outlive a gateway (as VMs do): released here.
        for data_path in {gw.config.data_path for gw in started}:
            await release_volumes(data_path)
        if IS_ROOT:
            remove_host_firewall(TEST_NETNS_PREFIX)
            remove_host_firewall(TEST_QEMU_PREFIX)
            remove_blackhole(TEST_NETNS_CIDR)
            remove_blackhole(TEST_QEMU_CIDR)
            remove_empty_cgroup_parents(TEST_CGROUP)
            remove_empty_cgroup_parents(TEST_QEMU_CGROUP)


@pytest.fixture(params=DRIVERS)
async def gateway(request: pytest.FixtureRequest, gateway_factory: object) -> GatewayUnderTest:
    return await gateway_factory(request.param)  # type: ignore[operator]


@pytest.fixture
async def gw(gateway_factory: object) -> GatewayUnderTest:
    """A gateway on the process driver: for API behaviour that does not depend on the driver."""
    return await gateway_factory("process")  # type: ignore[operator]


@pytest.fixture(scope="session")
def rootfs_images() -> ImageStore:
    """The shipped image definitions in the test cache (ROOTFS_CACHE), the default image built."""
    reason = rootfs_missing()
    if reason is not None:
        pytest.skip(reason)
    return ensure_test_images("default")


@pytest.fixture(scope="session")
def acme_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeTestEnv]:
    """pebble + bind9 on loopback for the whole session (zones example.test and example.org.test)."""
    env = AcmeTestEnv(tmp_path_factory.mktemp("acme-env"))
    env.start()
    try:
        yield env
    finally:
        env.stop()
