"""Escape attempts from inside VMs, through ``/execute`` as a tenant would run them.

Each test asserts on what code in the VM observes (its uid map, capability sets, seccomp mode, the
processes and files it sees, the errors it gets), never on the configuration we wrote, and ends by
checking the gateway is still healthy. The netns driver (runc containers) gets every attempt; the qemu
driver (a guest kernel behind QEMU) those that mean something across a hypervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayUnderTest
from tests.qemu_env import qemu_missing

IS_ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not IS_ROOT, reason="VM drivers with isolation need root"),
]
# Small limits, so that the bombs below reach them quickly.
PIDS_MAX = 96
DISK_MB = 48
VM_MEMORY_MB = 256
NETNS = pytest.param("netns", id="netns")
QEMU = pytest.param(
    "qemu",
    id="qemu",
    marks=[pytest.mark.slow, pytest.mark.skipif(qemu_missing() is not None, reason=qemu_missing() or "")],
)
CAP_NAMES = {
    12: "NET_ADMIN",
    13: "NET_RAW",
    16: "SYS_MODULE",
    17: "SYS_RAWIO",
    19: "SYS_PTRACE",
    21: "SYS_ADMIN",
}
CONNECT_TIMEOUT_S = 1.5

# Connects to each host:port given, one per line: "open", "refused" or "timeout"/the error's name.
PROBE = r"""
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(TIMEOUT)
    try:
        s.connect((host, int(port)))
        print(target, "open")
    except socket.timeout:
        print(target, "timeout")
    except OSError as exc:
        print(target, type(exc).__name__)
""".replace("TIMEOUT", str(CONNECT_TIMEOUT_S))


async def start(gateway_factory: Any, driver: str) -> GatewayUnderTest:
    return await gateway_factory(driver, netns={"pids_max": PIDS_MAX, "disk_mb": DISK_MB})


async def new_vm(gw: GatewayUnderTest) -> tuple[str, dict[str, Any]]:
    status, session = await gw.request("POST", "/v1/sessions/session", json={"api_key": gw.api_key})
    assert status == 200, session
    sid = session["session_id"]
    status, vm = await gw.request(
        "POST", "/v1/vms", json={"session_id": sid, "memory_mb": VM_MEMORY_MB, "vm_lifetime_seconds": 300}
    )
    assert status == 200 and vm["status"] == "active", vm
    return sid, vm


async def run(
    gw: GatewayUnderTest, sid: str, command: str, *, language: str = "bash", limit_s: int = 60
) -> dict:
    status, out = await gw.request(
        "POST",
        "/execute",
        json={"session_id": sid, "command": command, "language": language, "timeout": limit_s},
    )
    assert status == 200, out
    return out


async def python(gw: GatewayUnderTest, sid: str, code: str, *args: str) -> dict:
    argv = " ".join(f"'{a}'" for a in args)
    return await run(gw, sid, f"python3 - {argv} <<'EOF'\n{code}\nEOF")


async def assert_healthy(gw: GatewayUnderTest) -> None:
    async with gw.http.get(f"http://{gw.config.admin.listen}/healthz") as resp:
        assert resp.status == 200
    status, _ = await gw.request("GET", "/v1/vms")
    assert status == 200


def read(path: str) -> str:
    """A small file's text ('' when missing): /proc and /sys reads that do not block."""
    try:
        return Path(path).read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


async def host_ip_of(gw: GatewayUnderTest, vm_id: str) -> str:
    record = await gw.services.store.get_vm(vm_id)
    assert record is not None
    return str(record.handle["host_ip"])


@contextlib.contextmanager
def host_listener(address: str) -> Iterator[int]:
    """A TCP listener on one of the host's VM-facing addresses, as a host service bound there would be."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(params=[NETNS, QEMU])
async def vm_gateway(request: pytest.FixtureRequest, gateway_factory: Any) -> AsyncIterator[GatewayUnderTest]:
    gw = await start(gateway_factory, request.param)
    yield gw
    await assert_healthy(gw)


@pytest.fixture
async def netns_gateway(gateway_factory: Any) -> AsyncIterator[GatewayUnderTest]:
    gw = await start(gateway_factory, "netns")
    yield gw
    await assert_healthy(gw)


# --- who the VM is -------------------------------------------------------------------------------------


async def test_root_in_the_vm_is_an_unprivileged_host_range_without_dangerous_capabilities(
    netns_gateway: GatewayUnderTest,
) -> None:
    gw = netns_gateway
    sid, _vm = await new_vm(gw)
    out = await run(
        gw,
        sid,
        "id -u; cat /proc/self/uid_map /proc/self/gid_map; "
        "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status",
    )
    lines = out["stdout"].splitlines()
    assert lines[0] == "0"
    for mapping in lines[1:3]:
        inside, outside, count = map(int, mapping.split())
        assert inside == 0 and outside >= 65536 and count <= 65536, mapping  # never host root, never all ids
    fields = dict(line.split(":\t") for line in lines[3:])
    for name in ("CapEff", "CapBnd"):
        caps = int(fields[name], 16)
        held = [cap for bit, cap in CAP_NAMES.items() if caps & (1 << bit)]
        assert held == [], f"{name} holds {held}"
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # a filter is installed


async def test_two_vms_have_disjoint_id_ranges(netns_gateway: GatewayUnderTest) -> None:
    gw = netns_gateway
    ranges = []
    for _ in range(2):
        sid, _vm = await new_vm(gw)
        _inside, outside, count = map(int, (await run(gw, sid, "cat /proc/self/uid_map"))["stdout"].split())
        ranges.append(range(outside, outside + count))
    assert not set(ranges[0]) & set(ranges[1])


# --- the host's files, data and Redis ------------------------------------------------------------------


async def test_the_hosts_files_data_folder_redis_socket_and_repository_are_not_there(
    vm_gateway: GatewayUnderTest,
) -> None:
    gw = vm_gateway
    sid, _vm = await new_vm(gw)
    repo = str(REPO)
    redis_socket = gw.config.redis.url.removeprefix("unix://")
    paths = [str(gw.config.data_path), redis_socket, repo, str(REPO / "gateway" / "__init__.py")]
    code = r"""
import os, socket, sys
for path in sys.argv[1:]:
    print(path, os.path.exists(path))
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[2])
    print("redis", "connected")
except OSError as exc:
    print("redis", type(exc).__name__)
"""
    out = await python(gw, sid, code, *paths)
    seen = dict(line.rsplit(" ", 1) for line in out["stdout"].splitlines())
    assert seen == {**dict.fromkeys(paths, "False"), "redis": "FileNotFoundError"}, out
    # /etc/shadow inside is the image's own, not the host's.
    assert (await run(gw, sid, "cat /etc/shadow 2>&1 || true"))["stdout"] != read("/etc/shadow")


async def test_the_image_is_read_only_under_a_writable_layer_of_the_vms_own(
    netns_gateway: GatewayUnderTest,
) -> None:
    gw = netns_gateway
    sid_a, _ = await new_vm(gw)
    sid_b, _ = await new_vm(gw)
    out = await run(gw, sid_a, "echo mine > /etc/tenant-a && echo secret > /root/secret && cat /etc/tenant-a")
    assert out["stdout"] == "mine\n", out
    # The write went to A's layer: B (same image) sees neither file.
    out = await run(gw, sid_b, "ls /etc/tenant-a /root/secret 2>&1; echo done")
    assert "No such file" in out["stdout"] and "mine" not in out["stdout"], out
    # The root file system is an overlay whose lower layer the VM cannot remount writable.
    out = await run(gw, sid_a, "mount -o remount,rw /usr 2>&1; echo rc=$?")
    assert "rc=0" not in out["stdout"], out


async def test_other_vms_traffic_counters_and_cgroups_are_not_readable_in_sys(
    netns_gateway: GatewayUnderTest,
) -> None:
    """/sys is the host's (read-only): the masks keep other tenants' veths and cgroups out of it."""
    gw = netns_gateway
    sid_a, _ = await new_vm(gw)
    _sid_b, vm_b = await new_vm(gw)
    record = await gw.services.store.get_vm(vm_b["vm_id"])
    assert record is not None
    veth_b, cgroup = record.handle["veth"], gw.config.netns.cgroup_name
    out = await run(
        gw,
        sid_a,
        f"find /sys -maxdepth 6 \\( -name '{veth_b}' -o -name '{vm_b['vm_id']}' -o -name '{cgroup}' \\) "
        "2>/dev/null; ls /sys/class/net /sys/fs/cgroup 2>&1 | grep -v '^/sys' ; echo end",
    )
    assert out["stdout"].strip() == "end", out
    # (the host itself does have them: the test would see them if the masks were gone)
    assert read(f"/sys/class/net/{veth_b}/ifindex")


# --- processes ------------------------------------------------------------------------------------------


async def test_host_processes_and_other_vms_processes_are_invisible_and_unsignallable(
    vm_gateway: GatewayUnderTest,
) -> None:
    gw = vm_gateway
    sid_a, _ = await new_vm(gw)
    sid_b, _ = await new_vm(gw)
    marker = "sleep 31337"
    await run(gw, sid_b, f"({marker} >/dev/null 2>&1 &) ; echo started")
    code = r"""
import os, sys
pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
cmdlines = []
for pid in pids:
    try:
        cmdlines.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode())
    except OSError:
        pass
print(len(pids))
# (Spelled in pieces: this script's own command line must not match.)
print(any("3133" + "7" in c for c in cmdlines))
print(any(m in c for c in cmdlines for m in ("pyt" + "est", "redis" + "-server", "gateway" + " serve")))
try:
    os.kill(int(sys.argv[1]), 0)
    print("signalled")
except ProcessLookupError:
    print("no such process")
except PermissionError:
    print("refused")
"""
    out = await python(gw, sid_a, code, str(os.getpid()))
    count, sees_b, sees_host, signal = out["stdout"].splitlines()
    if gw.config.vms.driver == "netns":  # (a qemu guest lists its own kernel's threads too)
        assert int(count) < 20, out  # the VM's own few processes, not the host's hundreds
    assert (sees_b, sees_host) == ("False", "False"), out
    assert signal in ("no such process", "refused"), out


async def test_ptrace_of_another_vms_process_is_impossible(netns_gateway: GatewayUnderTest) -> None:
    gw = netns_gateway
    sid_a, _ = await new_vm(gw)
    sid_b, vm_b = await new_vm(gw)
    await run(gw, sid_b, "(sleep 31338 >/dev/null 2>&1 &); echo ok")
    record = await gw.services.store.get_vm(vm_b["vm_id"])
    assert record is not None
    # The host PID of B's sleep: what an attacker would have to guess.
    cgroup_procs = f"/sys/fs/cgroup/pids/{gw.config.netns.cgroup_name}/{vm_b['vm_id']}/cgroup.procs"
    if not read(cgroup_procs):
        cgroup_procs = f"/sys/fs/cgroup/{gw.config.netns.cgroup_name}/{vm_b['vm_id']}/cgroup.procs"
    target = next(int(pid) for pid in read(cgroup_procs).split() if "31338" in read(f"/proc/{pid}/cmdline"))
    code = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
print(libc.ptrace(PTRACE_ATTACH, int(sys.argv[1]), 0, 0), os.strerror(ctypes.get_errno()))
"""
    out = await python(gw, sid_a, code, str(target))
    assert out["stdout"].split(" ", 1)[0] == "-1", out
    assert "31338" in read(f"/proc/{target}/cmdline")  # B's process is untouched


# --- kernel interfaces ---------------------------------------------------------------------------------


async def test_mount_nsenter_modprobe_raw_sockets_and_proc_sys_are_refused(
    netns_gateway: GatewayUnderTest,
) -> None:
    gw = netns_gateway
    sid, _ = await new_vm(gw)
    code = r"""
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, fn):
    try:
        result = fn()
        print(name, "ALLOWED", result)
    except OSError as exc:
        print(name, "refused", exc.errno)
def call(rc):
    if rc < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return rc
os.makedirs("/mnt/x", exist_ok=True)
attempt("mount", lambda: call(libc.mount(b"none", b"/mnt/x", b"tmpfs", 0, None)))
attempt("unshare-user", lambda: call(libc.unshare(0x10000000)))
attempt("unshare-mount", lambda: call(libc.unshare(0x00020000)))
attempt("setns", lambda: call(libc.setns(os.open("/proc/1/ns/mnt", os.O_RDONLY), 0)))
attempt("init_module", lambda: call(libc.syscall(175, None, 0, b"")))
attempt("raw-socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close())
attempt("packet-socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close())
def write(path, value):
    with open(path, "w") as fh:
        fh.write(value)
attempt("proc-sys-kernel", lambda: write("/proc/sys/kernel/panic", "1"))
attempt("proc-sys-net", lambda: write("/proc/sys/net/ipv4/ip_forward", "1"))
attempt("sysrq", lambda: write("/proc/sysrq-trigger", "h"))
attempt("kcore", lambda: open("/proc/kcore", "rb").read(1))
attempt("reboot", lambda: call(libc.reboot(0x4321FEDC)))
"""
    out = await python(gw, sid, code)
    results = {line.split()[0]: line.split()[1] for line in out["stdout"].splitlines()}
    assert len(results) == 12, out
    assert {name for name, verdict in results.items() if verdict != "refused"} == set(), out
    # ip_forward on the host is still off.
    assert read("/proc/sys/net/ipv4/ip_forward").strip() == "0"


# --- limits ---------------------------------------------------------------------------------------------


async def test_a_fork_bomb_is_held_by_pids_max(netns_gateway: GatewayUnderTest) -> None:
    gw = netns_gateway
    sid, _ = await new_vm(gw)
    code = r"""
import os, signal, time
children = []
try:
    for _ in range(10 * int(os.environ["LIMIT"])):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
except OSError as exc:
    print(len(children), exc.errno, flush=True)
else:
    print(len(children), "no-limit", flush=True)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""
    out = await run(gw, sid, f"LIMIT={PIDS_MAX} python3 - <<'EOF'\n{code}\nEOF", limit_s=30)
    children, errno = out["stdout"].split()
    assert errno == "11", out  # EAGAIN: the pids cgroup said no
    assert int(children) < PIDS_MAX, out
    # The VM is usable again once the bomb's processes are gone.
    assert (await run(gw, sid, "echo alive"))["stdout"] == "alive\n"


async def test_a_memory_bomb_kills_only_its_own_vm_process(vm_gateway: GatewayUnderTest) -> None:
    gw = vm_gateway
    sid_a, _ = await new_vm(gw)
    sid_b, _ = await new_vm(gw)
    await run(gw, sid_b, "echo before > /tmp/mark")
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))"
    out = await run(gw, sid_a, f"python3 -c '{code}'; echo exit=$?", limit_s=60)
    assert "exit=137" in out["stdout"] or "MemoryError" in out["stderr"], out  # SIGKILLed by the OOM killer
    # A is still there, and so is B, untouched.
    assert (await run(gw, sid_a, "echo alive"))["stdout"] == "alive\n"
    assert (await run(gw, sid_b, "cat /tmp/mark"))["stdout"] == "before\n"


async def test_filling_the_disk_stops_at_the_writable_layers_limit(netns_gateway: GatewayUnderTest) -> None:
    gw = netns_gateway
    sid, _ = await new_vm(gw)
    free_before = os.statvfs(gw.config.data_path).f_bavail
    out = await run(
        gw, sid, "dd if=/dev/zero of=/root/fill bs=1M count=1000 2>&1; echo rc=$?; df -m / | tail -1"
    )
    assert "No space left on device" in out["stdout"], out
    size_mb = int((await run(gw, sid, "du -sm /root/fill | cut -f1"))["stdout"])
    assert size_mb <= DISK_MB, out
    # The host's file system lost at most the layer's size.
    assert (free_before - os.statvfs(gw.config.data_path).f_bavail) * os.statvfs("/").f_frsize <= (
        DISK_MB + 8
    ) << 20


# --- network --------------------------------------------------------------------------------------------


async def test_host_services_and_other_vms_are_unreachable(vm_gateway: GatewayUnderTest) -> None:
    gw = vm_gateway
    sid_a, vm_a = await new_vm(gw)
    sid_b, vm_b = await new_vm(gw)
    # B serves on 0.0.0.0:8000: the host reaches it (the edge's direction), A must not.
    await run(gw, sid_b, "(python3 -m http.server 8000 >/dev/null 2>&1 &); echo ok")
    await wait_port(vm_b["vm_ip"] if "vm_ip" in vm_b else await vm_ip(gw, vm_b["vm_id"]), 8000)
    ip_b = await vm_ip(gw, vm_b["vm_id"])
    own_host_side = await host_ip_of(gw, vm_a["vm_id"])
    b_host_side = await host_ip_of(gw, vm_b["vm_id"])
    with host_listener(own_host_side) as own_port, host_listener(b_host_side) as b_port:
        targets = [
            f"{ip_b}:8000",  # another VM
            f"{own_host_side}:{own_port}",  # a host service on the address the VM's traffic arrives at
            f"{b_host_side}:{b_port}",  # a host service on another VM's veth
            f"{own_host_side}:{gw.config.admin.listen.rsplit(':', 1)[1]}",  # the admin port, by number
            f"{own_host_side}:{gw.config.server.listen.rsplit(':', 1)[1]}",  # the API/edge port
        ]
        out = await python(gw, sid_a, PROBE, *targets)
    verdicts = dict(line.split(" ", 1) for line in out["stdout"].splitlines())
    assert set(verdicts) == set(targets), out
    assert not [t for t, v in verdicts.items() if v == "open"], verdicts


async def vm_ip(gw: GatewayUnderTest, vm_id: str) -> str:
    record = await gw.services.store.get_vm(vm_id)
    assert record is not None
    return record.ip


async def wait_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                _reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
