"""The VmDriver contract, run against every driver, plus what only the netns or process driver promises.

Every test uses its own CIDRs, name prefix and cgroup (``gwd`` / ``gateway-drvtest`` / 172.31.254.0/24 /
127.79.0.0/24), none of which a developer's gateway or the API tests use. ``host_guard`` checks after each
test that nothing of ours is left on the host (namespaces, veths, cgroups, processes), removes it
if so and fails the test: a leak is a bug even when the test body passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, override
from gateway.errors import DriverError, VmNotRunning
from gateway.orchestrator.drivers import _host, hostfw
from gateway.orchestrator.drivers.base import ExecResult, VmDriver, VmInfo, VmSpawn, VmSpec
from gateway.orchestrator.drivers.registry import make_driver
from tests.qemu_env import guest_image, qemu_missing
from tests.rootfs_env import CACHE_ROOT as ROOTFS_CACHE

IS_ROOT = os.geteuid() == 0
HAS_IP = shutil.which("ip") is not None
NETNS_CIDR = "172.31.254.0/24"
NETNS_PREFIX = "gwd"
CGROUP_NAME = "gateway-drvtest"
PROCESS_CIDR = "127.79.0.0/24"
QEMU_CIDR = "172.31.252.0/23"
CGROUP_ROOT = Path("/sys/fs/cgroup")
APP_PORT = 3000
EXEC_TIMEOUT_S = 20.0
GONE_TIMEOUT_S = 5.0
MAX_OUTPUT_BYTES = 64 * 1024
NEEDS_ROOT = pytest.mark.skipif(not (IS_ROOT and HAS_IP), reason="the netns driver needs root and iproute2")
NEEDS_QEMU = pytest.mark.skipif(qemu_missing() is not None, reason=qemu_missing() or "")
DRIVERS = [
    pytest.param("process", id="process"),
    pytest.param("netns", id="netns", marks=[pytest.mark.root, NEEDS_ROOT]),
    pytest.param("qemu", id="qemu", marks=[pytest.mark.root, pytest.mark.slow, NEEDS_QEMU]),
]
# Host drivers start a VM in well under a second; qemu boots a kernel under emulation (TCG here).
BOOT_BUDGET_S = {"process": 5.0, "netns": 5.0, "qemu": 60.0}
QEMU_GUEST_HOME = "/home/vm"
NETNS_VM_HOME = "/root"

# Binds, listens, forks a server into the background and exits: once execute returns, it accepts.
SERVER = r"""
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
pid = os.fork()
if pid:
    print(pid, flush=True)
    os._exit(0)
while True:
    conn, _ = s.accept()
    conn.sendall(f"{os.environ['VM_ID']} {os.environ.get('GREETING', '')}\n".encode())
    conn.close()
"""


# --- harness -------------------------------------------------------------------------------------------


@dataclass
class Harness:
    kind: str
    config: Config
    driver: VmDriver
    tmp_path: Path
    made: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def work_dir(self) -> Path:
        return self.config.data_path / "vms"

    def home(self, vm_id: str) -> str:
        """The VM's working folder as its commands see it."""
        if self.kind == "process":
            return str(self.work_dir / vm_id / "home")
        return QEMU_GUEST_HOME if self.kind == "qemu" else NETNS_VM_HOME

    async def gone(self, info: VmInfo, pids: set[int]) -> set[int]:
        """Which of the VM's processes still run (inside the VM for netns and qemu, whose commands see
        their own PID namespace; on the host for process)."""
        if self.kind == "process":
            return await await_gone(pids)
        script = (
            "for p in "
            + " ".join(map(str, pids))
            + '; do while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; done'
        )
        await self.run(info, script, timeout_s=GONE_TIMEOUT_S)
        alive = await self.run(
            info,
            "for p in " + " ".join(map(str, pids)) + '; do kill -0 "$p" 2>/dev/null && echo "$p"; done; true',
        )
        return {int(p) for p in alive.stdout.split()}

    async def session_of(self, info: VmInfo, pid: int) -> int:
        if self.kind == "process":
            return os.getsid(pid)
        # Field 6 of /proc/<pid>/stat (the command name, field 2, has no spaces here).
        return int((await self.run(info, f"cut -d' ' -f6 /proc/{pid}/stat")).stdout)

    def new_driver(self) -> VmDriver:
        """A second driver on the same host state: what a restarted gateway builds."""
        return make_driver(self.config)

    async def create(self, vm_id: str, slot: int, **kwargs: Any) -> VmInfo:
        spec = VmSpec(
            vm_id=vm_id,
            slot=slot,
            vcpu_count=kwargs.pop("vcpu_count", 1),
            memory_mb=kwargs.pop("memory_mb", 256),
            **kwargs,
        )
        if _host.is_vm_id(vm_id):
            self.made[vm_id] = {"slot": slot}
        info = await self.driver.create(spec)
        self.made[vm_id] = dict(info.handle)
        return info

    async def run(
        self,
        info: VmInfo,
        script: str,
        *,
        timeout_s: float = EXEC_TIMEOUT_S,
        env: dict[str, str] | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> ExecResult:
        return await self.driver.execute(
            info.vm_id,
            info.handle,
            ["sh", "-c", script],
            env=env or {},
            timeout_s=timeout_s,
            max_output_bytes=max_output_bytes,
        )

    def leftovers(self, vm_id: str, slot: int) -> list[str]:
        """Host resources of one VM that still exist."""
        found = []
        if (self.work_dir / vm_id).exists():
            found.append("work folder")
        if self.kind in ("netns", "qemu"):
            if Path(f"/var/run/netns/{NETNS_PREFIX}-{slot}").exists():
                found.append("namespace")
            if Path(f"/sys/class/net/{NETNS_PREFIX}h{slot}").exists():
                found.append("veth")
            found += [str(d) for d in cgroup_dirs(vm_id) if d.exists()]
        else:
            found += [f"pid {pid}" for pid in marked_pids(str(self.work_dir / vm_id))]
        return found


def make_config(tmp_path: Path, kind: str, **sections: dict[str, object]) -> Config:
    config = override(
        Config(),
        server={"data_dir": str(tmp_path / "data")},
        vms={"driver": kind},
        netns={"cidr": NETNS_CIDR, "name_prefix": NETNS_PREFIX, "cgroup_name": CGROUP_NAME},
        process={"cidr": PROCESS_CIDR, "app_port": 8123, "allow_root": True},
        qemu={
            "cidr": QEMU_CIDR,
            "name_prefix": NETNS_PREFIX,
            "cgroup_name": CGROUP_NAME,
            "image_dir": str(guest_image()) if kind == "qemu" else "",
        },
        images={"dir": str(ROOTFS_CACHE)},
    )
    return override(config, **sections) if sections else config


def proc_cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@contextlib.asynccontextmanager
async def harness(kind: str, tmp_path: Path, **sections: dict[str, object]) -> AsyncIterator[Harness]:
    config = make_config(tmp_path, kind, **sections)
    h = Harness(kind, config, make_driver(config), tmp_path)
    assert h.driver.name == kind
    await h.driver.start()
    try:
        yield h
    finally:
        errors = []
        for vm_id, handle in h.made.items():
            try:
                await h.driver.destroy(vm_id, handle)
            except DriverError as exc:
                errors.append(str(exc))
        await h.driver.close()
        if kind != "process":  # the driver keeps its firewall table on purpose; the test removes it
            await hostfw.remove(NETNS_PREFIX)
        assert not errors, errors


@pytest.fixture
def host_guard(tmp_path: Path) -> Iterator[None]:
    """After the test (and its driver's teardown): remove and report anything of ours still on the host."""
    yield
    leaked = []
    pids = marked_pids(str(tmp_path))
    if IS_ROOT and HAS_IP:
        for d in (CGROUP_ROOT / c / CGROUP_NAME for c in ("memory", "cpu")):
            for child in d.iterdir() if d.is_dir() else ():
                if child.is_dir():
                    leaked.append(str(child))
                    pids += [int(p) for p in (child / "cgroup.procs").read_text().split()]
        for ns in os.listdir("/var/run/netns") if os.path.isdir("/var/run/netns") else ():
            if re.fullmatch(rf"{NETNS_PREFIX}-[0-9]+", ns):
                leaked.append(f"namespace {ns}")
                out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
                pids += [int(p) for p in out.split()]
    for pid in set(pids):
        leaked.append(f"pid {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if IS_ROOT and HAS_IP:
        for link in os.listdir("/sys/class/net"):
            if re.fullmatch(rf"{NETNS_PREFIX}h[0-9]+", link):
                leaked.append(f"veth {link}")
                subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in os.listdir("/var/run/netns") if os.path.isdir("/var/run/netns") else ():
            if re.fullmatch(rf"{NETNS_PREFIX}-[0-9]+", ns):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        wait_gone(set(pids))
        for d in (CGROUP_ROOT / c / CGROUP_NAME for c in ("memory", "cpu")):
            for child in d.iterdir() if d.is_dir() else ():
                if child.is_dir():
                    child.rmdir()
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()
        for cidr in (NETNS_CIDR, QEMU_CIDR):
            subprocess.run(["ip", "route", "del", "blackhole", cidr], capture_output=True)
    assert not leaked, f"left on the host after the test: {leaked}"


@pytest.fixture(params=DRIVERS)
async def h(request: pytest.FixtureRequest, tmp_path: Path, host_guard: None) -> AsyncIterator[Harness]:
    async with harness(request.param, tmp_path) as built:
        yield built


@pytest.fixture
async def nh(tmp_path: Path, host_guard: None) -> AsyncIterator[Harness]:
    if not (IS_ROOT and HAS_IP):
        pytest.skip("the netns driver needs root and iproute2")
    async with harness("netns", tmp_path) as built:
        yield built


@pytest.fixture
async def ph(tmp_path: Path, host_guard: None) -> AsyncIterator[Harness]:
    async with harness("process", tmp_path) as built:
        yield built


def cgroup_dirs(vm_id: str) -> list[Path]:
    return [CGROUP_ROOT / c / CGROUP_NAME / vm_id for c in ("memory", "cpu")]


def marked_pids(vm_dir_prefix: str) -> list[int]:
    """Processes whose GATEWAY_VM_DIR marker lies under a folder (the process driver's VMs)."""
    found = []
    for pid in _host.list_pids():
        with contextlib.suppress(OSError):
            for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if entry.startswith(b"GATEWAY_VM_DIR=") and entry[15:].decode().startswith(vm_dir_prefix):
                    found.append(pid)
    return [p for p in found if _host.is_running(p)]


def wait_gone(pids: set[int], timeout_s: float = GONE_TIMEOUT_S) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := {p for p in pids if _host.is_running(p)}) and time.monotonic() < deadline:
        time.sleep(0.01)
    return alive


async def await_gone(pids: set[int]) -> set[int]:
    return await asyncio.to_thread(wait_gone, pids)


async def read_line(ip: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(ip, port)
    try:
        return await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()


def roundtrip(handle: Any) -> dict[str, Any]:
    """The handle as the orchestrator gets it back from Redis."""
    return json.loads(json.dumps(handle))


# --- the contract, on every driver -----------------------------------------------------------------------


async def test_addresses_are_distinct_and_inside_the_cidr(h: Harness) -> None:
    assert h.driver.capacity > 0
    addresses = [h.driver.address(slot) for slot in range(h.driver.capacity)]
    assert len(set(addresses)) == len(addresses)
    with pytest.raises(DriverError):
        h.driver.address(h.driver.capacity)


async def test_start_is_idempotent(h: Harness) -> None:
    await h.driver.start()
    await h.driver.start()


async def test_create_inspect_destroy(h: Harness) -> None:
    started = time.monotonic()
    info = await h.create("vm-life", 1)
    assert time.monotonic() - started < BOOT_BUDGET_S[h.kind]
    assert (info.vm_id, info.ip, info.running) == ("vm-life", h.driver.address(1), True)
    handle = roundtrip(info.handle)
    assert handle["slot"] == 1 and isinstance(handle["init_pid"], int)
    # The VM's record is the gateway's alone (a qemu VM's holds the token that runs commands in it).
    assert (h.work_dir / "vm-life" / _host.VM_FILE).stat().st_mode & 0o077 == 0
    now = await h.new_driver().inspect("vm-life", handle)
    assert (now.running, now.ip) == (True, info.ip)
    # The orchestrator's half-made record holds only the slot; the VM's own record completes it.
    assert (await h.driver.inspect("vm-life", {"slot": 1})).running

    await h.driver.destroy("vm-life", handle)
    assert h.leftovers("vm-life", 1) == []
    assert not _host.is_running(handle["init_pid"])
    assert not (await h.driver.inspect("vm-life", handle)).running
    # Idempotent, also with a partial handle or none, and for VMs that never existed.
    await h.driver.destroy("vm-life", handle)
    await h.driver.destroy("vm-life", {"slot": 1})
    await h.driver.destroy("vm-never", {})
    assert not (await h.driver.inspect("vm-never", {})).running
    assert not (
        await h.driver.inspect("vm-never", {"slot": 2, "init_pid": 1, "init_start_ticks": -1})
    ).running


async def test_execute_output_exit_code_env_and_folder(h: Harness) -> None:
    info = await h.create("vm-exec", 1, env={"GREETING": "hi there", "KEEP": "spec"})
    result = await h.run(
        info,
        'echo "$GREETING|$KEEP|$EXTRA|$VM_ID|$VM_IP|$LANG"; pwd; echo "$HOME"; echo oops >&2; exit 7',
        env={"EXTRA": "call", "GREETING": "override"},
    )
    home = h.home("vm-exec")
    assert result.stdout.decode().splitlines() == [
        f"override|spec|call|vm-exec|{info.ip}|C.UTF-8",
        home,
        home,
    ]
    assert (result.stderr, result.exit_code, result.timed_out, result.truncated) == (
        b"oops\n",
        7,
        False,
        False,
    )
    assert 0 <= result.duration_s < EXEC_TIMEOUT_S
    # Files written by one command are there for the next (the VM's home persists).
    await h.run(info, "echo kept > mark")
    assert (await h.run(info, "cat mark")).stdout == b"kept\n"
    # The gateway's own environment does not leak into the VM.
    assert (await h.run(info, 'echo "${PYTEST_CURRENT_TEST:-none}"')).stdout == b"none\n"


async def test_spawn_streams_stdin_and_stdout_and_reports_the_exit(h: Harness) -> None:
    """``VmSpawn`` (files and terminals ride on it): the command runs in the VM like execute's, its
    stdin and stdout streamed both ways, larger than any pipe buffer; ``aclose`` kills one that lingers."""
    assert isinstance(h.driver, VmSpawn)
    info = await h.create("vm-spawn", 1, env={"GREETING": "hi"})
    script = 'echo "$GREETING $VM_ID $(pwd)"; sha256sum; echo oops >&2; exit 5'
    process = await h.driver.spawn(info.vm_id, roundtrip(info.handle), ["bash", "-c", script], env={})
    payload = os.urandom(3 * 1024 * 1024)
    received = bytearray()

    async def read_all() -> None:
        while chunk := await process.read():
            received.extend(chunk)

    reading = asyncio.ensure_future(read_all())
    try:
        for start in range(0, len(payload), 100_000):
            await process.write(payload[start : start + 100_000])
        process.close_stdin()
        async with asyncio.timeout(EXEC_TIMEOUT_S):
            await reading
            code = await process.wait()
    finally:
        await process.aclose()
    lines = bytes(received).decode().splitlines()
    assert lines == [f"hi vm-spawn {h.home('vm-spawn')}", f"{hashlib.sha256(payload).hexdigest()}  -"]
    assert code == 5 and process.stderr_tail() == b"oops\n"

    lingering = await h.driver.spawn(
        info.vm_id, roundtrip(info.handle), ["sh", "-c", "echo $$; sleep 600"], env={}
    )
    pid = int((await lingering.read()).strip())
    await lingering.aclose()
    assert await h.gone(info, {pid}) == set()
    assert await lingering.read() == b""  # closed: a reader is told, never left waiting


async def test_execute_reports_the_commands_own_cpu(h: Harness) -> None:
    """cpu_s is what the command used, not the VM: a busy loop counts, a sleep and a busy sibling
    started in the background (not waited for) do not."""
    info = await h.create("vm-cpu", 1)
    busy = await h.run(info, "python3 -c 'import time\nwhile time.process_time() < 0.3: pass'")
    assert busy.exit_code == 0, busy.stderr
    assert busy.cpu_s is not None and 0.29 <= busy.cpu_s <= busy.duration_s + 0.1, busy
    await h.run(info, "python3 -c 'while True: pass' >/dev/null 2>&1 & echo $! > spin.pid")
    try:
        # The spinner alone would add about a second; starting sh and sleep costs a little (more under
        # qemu's emulation).
        idle = await h.run(info, "sleep 1")
        assert idle.cpu_s is not None and idle.cpu_s < 0.4, idle
    finally:
        await h.run(info, 'kill "$(cat spin.pid)"')


async def test_vm_processes_inherit_no_gateway_descriptors(h: Harness) -> None:
    """No socket or pipe of the gateway (its listener, Redis, other VMs' pipes) reaches a VM."""
    info = await h.create("vm-fds", 1, env={})
    # A command first: by its end the VM's init has certainly replaced the OCI runtime's own (runc init,
    # whose Go runtime holds an epoll descriptor and a pipe until it execs: what a loaded machine once
    # showed here).
    listed = await h.run(info, 'for fd in /proc/self/fd/*; do [ -e "$fd" ] && readlink "$fd"; done; true')
    if h.kind != "qemu":  # (qemu's init is QEMU, whose own control socket is no gateway descriptor)
        fd_dir = Path(f"/proc/{info.handle['init_pid']}/fd")
        init_links = []
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(FileNotFoundError):  # a shell's short-lived descriptor during exec
                init_links.append(os.readlink(fd_dir / fd))
        assert init_links and not [link for link in init_links if link.startswith(("socket:", "pipe:"))]
    # A command sees its stdio (stdout is a file here) and nothing else of the gateway's.
    links = listed.stdout.decode().split()
    assert not [link for link in links if link.startswith(("socket:", "pipe:"))], links


async def test_execute_timeout_kills_the_command_group(h: Harness) -> None:
    info = await h.create("vm-timeout", 1)
    started = time.monotonic()
    result = await h.run(
        info, "sleep 300 & echo $! > bg.pid; echo $$ > fg.pid; echo partial; wait", timeout_s=0.5
    )
    assert (result.timed_out, result.exit_code, result.stdout) == (True, None, b"partial\n")
    assert 0.5 <= result.duration_s < 5 and time.monotonic() - started < 5
    pids = {int(p) for p in (await h.run(info, "cat fg.pid bg.pid")).stdout.split()}
    assert len(pids) == 2
    assert await h.gone(info, pids) == set()
    # The VM itself is unharmed.
    assert (await h.driver.inspect(info.vm_id, info.handle)).running
    assert (await h.run(info, "echo still")).stdout == b"still\n"


async def test_output_is_truncated_at_the_cap(h: Harness) -> None:
    info = await h.create("vm-trunc", 1)
    result = await h.run(
        info,
        "head -c 5000 /dev/zero | tr '\\0' a; head -c 300 /dev/zero | tr '\\0' b >&2",
        max_output_bytes=100,
    )
    assert (result.stdout, result.stderr, result.truncated) == (b"a" * 100, b"b" * 100, True)
    exact = await h.run(info, "printf 12345", max_output_bytes=5)
    assert (exact.stdout, exact.truncated) == (b"12345", False)


async def test_background_server_survives_execute_and_dies_with_destroy(h: Harness) -> None:
    info = await h.create("vm-bg", 1, env={"GREETING": "hello"})
    result = await h.driver.execute(
        info.vm_id,
        info.handle,
        ["python3", "-c", SERVER, info.ip, str(APP_PORT)],
        env={},
        timeout_s=EXEC_TIMEOUT_S,
        max_output_bytes=MAX_OUTPUT_BYTES,
    )
    # Returns as soon as the foreground exits, although the server holds the output files open.
    assert result.exit_code == 0 and result.duration_s < EXEC_TIMEOUT_S / 2, result
    server_pid = int(result.stdout)
    assert await read_line(info.ip, APP_PORT) == b"vm-bg hello\n"
    # A process that left the command's session and process group is still the VM's.
    escaped = await h.run(
        info,
        "setsid sh -c 'echo $$ > esc.pid; exec sleep 300' >/dev/null 2>&1 & "
        "while [ ! -s esc.pid ]; do sleep 0.01; done; cat esc.pid",
    )
    escaped_pid = int(escaped.stdout)
    assert await h.session_of(info, escaped_pid) != await h.session_of(info, server_pid)

    await h.driver.destroy(info.vm_id, info.handle)
    if h.kind == "process":
        assert await await_gone({server_pid, escaped_pid}) == set()
    else:  # the VM's processes end with its machine (qemu) or its PID namespace's init (netns)
        assert await await_gone({info.handle["init_pid"]}) == set()
    with pytest.raises(OSError):
        await read_line(info.ip, APP_PORT)


async def test_execute_in_a_destroyed_vm_is_refused(h: Harness) -> None:
    info = await h.create("vm-gone", 1)
    await h.driver.destroy(info.vm_id, info.handle)
    with pytest.raises(VmNotRunning):
        await h.run(info, "true")


async def test_vm_outlives_its_driver_object(h: Harness) -> None:
    info = await h.create("vm-restart", 1)
    await h.run(info, "echo before > mark")
    await h.driver.close()
    later, handle = h.new_driver(), roundtrip(info.handle)
    await later.start()
    try:
        assert (await later.inspect(info.vm_id, handle)).running
        result = await later.execute(
            info.vm_id,
            handle,
            ["cat", "mark"],
            env={},
            timeout_s=EXEC_TIMEOUT_S,
            max_output_bytes=MAX_OUTPUT_BYTES,
        )
        assert result.stdout == b"before\n"
        await later.destroy(info.vm_id, handle)
        assert h.leftovers(info.vm_id, 1) == []
    finally:
        await later.close()  # (a started driver holds its host names until then)


async def test_concurrent_creates_and_destroys(h: Harness) -> None:
    infos = await asyncio.gather(*(h.create(f"vm-c{slot}", slot) for slot in (1, 2, 3)))
    assert len({i.ip for i in infos}) == 3 and all(i.running for i in infos)
    results = await asyncio.gather(*(h.run(i, 'echo "$VM_ID"') for i in infos))
    assert [r.stdout for r in results] == [b"vm-c1\n", b"vm-c2\n", b"vm-c3\n"]
    await asyncio.gather(*(h.driver.destroy(i.vm_id, i.handle) for i in infos))
    assert [h.leftovers(i.vm_id, s) for i, s in zip(infos, (1, 2, 3), strict=True)] == [[], [], []]


async def test_create_failure_removes_what_it_made(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    module = inspect.getmodule(type(h.driver))
    monkeypatch.setattr(module, "INIT_COMMAND", ("/nonexistent/gateway-test-init",))
    with pytest.raises(DriverError, match="init"):
        await h.create("vm-fail", 1)
    assert h.leftovers("vm-fail", 1) == []


async def test_cancelled_create_removes_what_it_made(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    reached = asyncio.Event()

    async def hang(*args: object, **kwargs: object) -> tuple[int, int]:
        reached.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    # Where each driver starts its VM's init: runc for netns, a detached process for the others.
    monkeypatch.setattr(_host, "spawn_detached", hang)
    monkeypatch.setattr(_host, "run_logged", hang)
    task = asyncio.create_task(h.create("vm-cancel", 1))
    async with asyncio.timeout(EXEC_TIMEOUT_S):
        await reached.wait()
    assert (h.work_dir / "vm-cancel").exists()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.leftovers("vm-cancel", 1) == []


async def test_invalid_vm_id_makes_nothing(h: Harness) -> None:
    with pytest.raises(DriverError):
        await h.create("../escape", 1)
    assert not (h.work_dir.parent / "escape").exists()
    with pytest.raises(DriverError):
        await h.create("vm-slot", h.driver.capacity)
    assert h.leftovers("vm-slot", 0) == []


async def test_a_stale_destroy_spares_the_slots_next_vm(h: Harness) -> None:
    first = await h.create("vm-first", 1)
    await h.driver.destroy(first.vm_id, first.handle)
    second = await h.create("vm-second", 1)
    await h.driver.destroy(first.vm_id, first.handle)
    await h.driver.destroy(first.vm_id, {"slot": 1})
    assert (await h.driver.inspect(second.vm_id, second.handle)).running
    assert (await h.run(second, 'echo "$VM_ID"')).stdout == b"vm-second\n"


async def test_sweep_removes_only_vms_of_dead_slots(h: Harness) -> None:
    keep = await h.create("vm-keep", 1)
    orphan = await h.create("vm-orphan", 2)
    await h.run(orphan, "sleep 300 >/dev/null 2>&1 &")
    assert await h.driver.sweep({1}) == 1
    assert h.leftovers("vm-orphan", 2) == []
    assert not _host.is_running(orphan.handle["init_pid"])
    assert (await h.driver.inspect(keep.vm_id, keep.handle)).running
    assert await h.driver.sweep({1}) == 0


# --- netns only ----------------------------------------------------------------------------------------


def exists(path: str) -> bool:
    return os.path.exists(path)


def read_text(path: str) -> str:
    return Path(path).read_text()


def inet_addresses(ip_json: str) -> list[tuple[str, int]]:
    return [
        (a["local"], a["prefixlen"]) for a in json.loads(ip_json)[0]["addr_info"] if a["family"] == "inet"
    ]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@NEEDS_ROOT
async def test_netns_start_blackholes_the_cidr_and_leaves_forwarding_alone(nh: Harness) -> None:
    forwarding = read_text("/proc/sys/net/ipv4/ip_forward")
    routes = json.loads(ip("-j", "route", "show", "type", "blackhole").stdout)
    assert {"type": "blackhole", "dst": NETNS_CIDR} in [{k: r[k] for k in ("type", "dst")} for r in routes]
    info = await nh.create("vm-route", 1)
    assert json.loads(ip("-j", "route", "get", info.ip).stdout)[0]["dev"] == f"{NETNS_PREFIX}h1"
    await nh.driver.destroy(info.vm_id, info.handle)
    # With the VM gone, its address is unroutable here, never sent via the default route.
    assert ip("route", "get", info.ip, check=False).returncode != 0
    assert read_text("/proc/sys/net/ipv4/ip_forward") == forwarding


@NEEDS_ROOT
async def test_netns_network_layout(nh: Harness) -> None:
    info = await nh.create("vm-net", 2)
    host_ip = info.handle["host_ip"]
    assert (info.ip, host_ip) == ("172.31.254.10", "172.31.254.9")
    assert inet_addresses(ip("-j", "addr", "show", "dev", f"{NETNS_PREFIX}h2").stdout) == [(host_ip, 30)]
    inside = await nh.run(
        info, "ip -j addr show dev eth0; ip -j route show default; readlink /proc/self/ns/net"
    )
    addr, route, ns = inside.stdout.decode().splitlines()
    assert inet_addresses(addr) == [(info.ip, 30)]
    assert json.loads(route)[0]["gateway"] == host_ip
    assert ns != os.readlink("/proc/self/ns/net")
    # Loopback is up inside: a VM-local service on 127.0.0.1 works.
    loop = await nh.run(info, "ip -j link show dev lo")
    assert "UP" in json.loads(loop.stdout)[0]["flags"]


@NEEDS_ROOT
async def test_netns_cgroup_limits_cover_init_and_commands(nh: Harness) -> None:
    info = await nh.create("vm-cg", 1, memory_mb=300, vcpu_count=2)
    memory_dir, cpu_dir = cgroup_dirs("vm-cg")
    assert int((memory_dir / "memory.limit_in_bytes").read_text()) == 300 * 1024 * 1024
    assert int((cpu_dir / "cpu.cfs_quota_us").read_text()) == 200_000
    assert int((cpu_dir / "cpu.cfs_period_us").read_text()) == 100_000
    result = await nh.run(info, "sleep 300 >/dev/null 2>&1 & echo $!; cat /proc/self/cgroup")
    _bg_pid, *cgroup_lines = result.stdout.decode().splitlines()
    # The VM has a cgroup namespace of its own: its cgroup is its root, the host's tree is not shown.
    assert cgroup_lines and {line.split(":", 2)[2] for line in cgroup_lines} == {"/"}
    for directory in (memory_dir, cpu_dir):
        members = {int(p) for p in (directory / "cgroup.procs").read_text().split()}
        assert info.handle["init_pid"] in members
        sleeping = [p for p in members if b"sleep\x00300" in proc_cmdline(p)]
        assert len(sleeping) == 1  # the command's background child is in the VM's cgroup too


@NEEDS_ROOT
async def test_netns_root_in_the_vm_listens_below_1024(nh: Harness) -> None:
    """Web apps on port 80 work: the VM's network namespace is its user namespace's, where its root holds
    NET_BIND_SERVICE (in a namespace the host's user namespace owned, it would not)."""
    info = await nh.create("vm-port80", 1, env={"GREETING": "on80"})
    started = await nh.driver.execute(
        info.vm_id,
        info.handle,
        ["python3", "-c", SERVER, "0.0.0.0", "80"],
        env={},
        timeout_s=EXEC_TIMEOUT_S,
        max_output_bytes=MAX_OUTPUT_BYTES,
    )
    assert started.exit_code == 0, started
    assert await read_line(info.ip, 80) == b"vm-port80 on80\n"


@NEEDS_ROOT
async def test_netns_vms_can_listen_on_the_same_port(nh: Harness) -> None:
    vms = [await nh.create(f"vm-iso{slot}", slot, env={"GREETING": f"g{slot}"}) for slot in (1, 2)]
    for info in vms:
        started = await nh.driver.execute(
            info.vm_id,
            info.handle,
            ["python3", "-c", SERVER, "0.0.0.0", "3000"],
            env={},
            timeout_s=EXEC_TIMEOUT_S,
            max_output_bytes=MAX_OUTPUT_BYTES,
        )
        assert started.exit_code == 0, started
    assert [await read_line(info.ip, 3000) for info in vms] == [b"vm-iso1 g1\n", b"vm-iso2 g2\n"]


@NEEDS_ROOT
async def test_netns_slot_taken_on_the_host_is_left_alone(nh: Harness) -> None:
    ip("netns", "add", f"{NETNS_PREFIX}-5")
    try:
        ip("link", "add", f"{NETNS_PREFIX}h6", "type", "veth", "peer", "name", f"{NETNS_PREFIX}t6")
        for vm_id, slot in (("vm-taken5", 5), ("vm-taken6", 6)):
            with pytest.raises(DriverError, match="in use"):
                await nh.create(vm_id, slot)
            assert not (nh.work_dir / vm_id).exists()
            assert not any(d.exists() for d in cgroup_dirs(vm_id))
        assert exists(f"/var/run/netns/{NETNS_PREFIX}-5")
        assert exists(f"/sys/class/net/{NETNS_PREFIX}h6")
    finally:
        ip("netns", "del", f"{NETNS_PREFIX}-5", check=False)
        ip("link", "del", f"{NETNS_PREFIX}h6", check=False)


@NEEDS_ROOT
async def test_netns_sweep_removes_orphans_of_this_prefix_only(nh: Harness) -> None:
    other = f"{NETNS_PREFIX}x-9"
    ip("netns", "add", f"{NETNS_PREFIX}-9")
    ip("netns", "add", other)
    orphan_cgroup = CGROUP_ROOT / "memory" / CGROUP_NAME / "vm-lost"
    orphan_cgroup.mkdir()
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        f"echo $$ > {orphan_cgroup}/cgroup.procs && echo in && exec sleep 300 >/dev/null",
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and await proc.stdout.readline() == b"in\n"
        assert await nh.driver.sweep(set()) == 2
        assert await proc.wait() == -signal.SIGKILL
        assert not orphan_cgroup.exists()
        assert not exists(f"/var/run/netns/{NETNS_PREFIX}-9")
        assert exists(f"/var/run/netns/{other}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        ip("netns", "del", other, check=False)


@NEEDS_ROOT
async def test_netns_sweep_removes_a_container_whose_work_folder_is_gone(nh: Harness) -> None:
    """A VM whose record went with its data folder (a lost disk, a deleted data_dir) still has a runc
    container and mounts: sweep finds them by runc's state and the mount folder, and removes both."""
    info = await nh.create("vm-lostdir", 1)
    state = Path(f"/run/gateway-runc/{NETNS_PREFIX}/vm-lostdir")
    mounts = [line for line in read_mountinfo() if f"/run/gateway-vms/{NETNS_PREFIX}/vm-lostdir/" in line]
    assert exists(str(state)) and len(mounts) == 5  # userns, disk, image, overlay, volume staging
    # The work folder (with vm.json) disappears under the running VM; only its disk file stays open.
    shutil.rmtree(info.handle["vm_dir"])
    assert await nh.driver.sweep(set()) >= 1
    assert not exists(str(state))
    assert not [line for line in read_mountinfo() if f"/run/gateway-vms/{NETNS_PREFIX}/vm-lostdir" in line]
    assert await await_gone({info.handle["init_pid"]}) == set()
    nh.made.pop("vm-lostdir")


@NEEDS_ROOT
async def test_netns_init_output_fills_the_vms_own_disk(tmp_path: Path, host_guard: None) -> None:
    """An init that logs without end (an image's program) writes on the VM's own layer: it fills that (the
    host spends at most the layer's size on it), and the VM runs on."""
    disk_mb = 32
    async with harness("netns", tmp_path, netns={"disk_mb": disk_mb}) as h:
        command = ("sh", "-c", "yes init-output-without-end; exec sleep 300")
        info = await h.create("vm-logs", 1, command=command)
        async with asyncio.timeout(EXEC_TIMEOUT_S):
            while int((await h.run(info, "df --output=avail -k / | tail -1")).stdout) > 64:
                pass  # (each round is an execute: no busy loop)
        assert (await h.driver.inspect(info.vm_id, info.handle)).running
        assert folder_bytes(Path(info.handle["vm_dir"])) <= (disk_mb + 1) << 20


def folder_bytes(folder: Path) -> int:
    """Bytes the folder's files take on disk (allocated blocks, as du counts)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def read_mountinfo() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


# --- process only --------------------------------------------------------------------------------------


async def test_process_env_names_the_vm_address_and_port(ph: Harness) -> None:
    info = await ph.create("vm-env", 4)
    result = await ph.run(info, 'echo "$HOST $PORT $VM_IP"')
    assert result.stdout.decode() == "127.79.0.5 8123 127.79.0.5\n"


async def test_process_sweep_spares_another_work_folder(ph: Harness, tmp_path: Path) -> None:
    async with harness("process", tmp_path / "other") as other:
        theirs = await other.create("vm-theirs", 1)
        assert await ph.driver.sweep(set()) == 0
        assert (await other.driver.inspect(theirs.vm_id, theirs.handle)).running
