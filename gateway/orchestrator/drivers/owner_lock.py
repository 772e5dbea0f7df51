"""One live gateway per set of host names: a driver holds a lock for what it names on the host.

Why: the netns and qemu drivers name what they make on the host after their settings (namespaces
``<name_prefix>-<slot>``, veths ``<name_prefix>h<slot>``, runc state and mount folders under
``<name_prefix>``, cgroups under ``<cgroup_name>``), and at start-up they sweep every such thing their own
Redis does not know. Two gateways sharing a prefix or a cgroup name each removed the other's VMs as
orphans (issue 17.7); two sharing addresses would route one's clients to the other's VMs.

So a driver holds, from ``start`` to ``close``, an ``flock`` on ``/run/gateway-vms/<name_prefix>.lock``
and on ``/run/gateway-vms/cgroup-<cgroup_name>.lock``, each naming its holder (pid, data folder, driver,
CIDR), and refuses to start while another live gateway holds either, or holds a CIDR that overlaps its
own, with an error that names that gateway and the settings to change. The kernel drops a lock when its
holder dies, even by SIGKILL, so a dead gateway's leftovers are still swept by the next gateway with its
names; and /run is a tmpfs, so nothing outlives a reboot. (Two gateways starting at the same instant with
different names but overlapping CIDRs can both miss the overlap: the names themselves are race-free.)

Reusable by any driver that names host resources: ``claim_host_names(...)`` in ``start``, ``release()``
in ``close``.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import DriverError

LOCK_ROOT = Path("/run/gateway-vms")
# Searchable by the VMs' unprivileged ids: the netns driver keeps their mount folders below it.
LOCK_ROOT_MODE = 0o711
LOCK_SUFFIX = ".lock"
CGROUP_LOCK_PREFIX = "cgroup-"
HOLDER_MAX_BYTES = 4096


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: written into the lock file by its holder."""

    pid: int | None
    data_dir: str
    driver: str
    section: str
    cidr: str

    def describe(self) -> str:
        return f"pid {self.pid or 'unknown'}, data folder {self.data_dir or 'unknown'}, driver {self.driver}"

    @classmethod
    def parse(cls, text: str) -> Holder:
        try:
            raw = json.loads(text)
            fields = (str(raw[key]) for key in ("data_dir", "driver", "section", "cidr"))
            return cls(int(raw["pid"]), *fields)
        except (ValueError, KeyError, TypeError):
            return cls(None, "", "unknown", "", "")  # being written, or not ours


class OwnerLock:
    """The locks a driver holds for its host names while it runs. Not thread-safe; one per driver.

    Released by ``release``, or when the object is collected: a driver dropped without ``close`` (a
    test's second driver object) must not keep the names from every later driver of its process.
    """

    def __init__(self, fds: list[int]) -> None:
        self._release = weakref.finalize(self, _close_all, fds)

    @property
    def held(self) -> bool:
        return self._release.alive

    def release(self) -> None:
        """Idempotent. The lock files stay: removing one could split a later claim across two inodes."""
        self._release()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def lock_paths(name_prefix: str, cgroup_name: str, root: Path = LOCK_ROOT) -> list[Path]:
    return [root / f"{name_prefix}{LOCK_SUFFIX}", root / f"{CGROUP_LOCK_PREFIX}{cgroup_name}{LOCK_SUFFIX}"]


def claim_host_names(
    *,
    section: str,
    name_prefix: str,
    cgroup_name: str,
    cidr: str,
    data_dir: Path,
    driver: str,
    root: Path = LOCK_ROOT,
) -> OwnerLock:
    """Lock ``name_prefix`` and ``cgroup_name`` for this process, or raise DriverError naming the live
    gateway that holds one of them or an overlapping CIDR. ``section`` is the settings' section
    ("netns", "qemu"), for the error."""
    try:
        root.mkdir(mode=LOCK_ROOT_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise DriverError(f"cannot make {root} for the host-name locks: {exc.strerror}") from exc
    me = Holder(os.getpid(), str(data_dir), driver, section, cidr)
    advice = (
        f"Stop that gateway, or give this one a {section}.name_prefix, {section}.cgroup_name and "
        f"{section}.cidr of its own"
    )
    fds: list[int] = []
    try:
        prefix_path, cgroup_path = lock_paths(name_prefix, cgroup_name, root)
        for path, setting, value, names in (
            (prefix_path, "name_prefix", name_prefix, "its VMs' namespaces, veths and runc state"),
            (cgroup_path, "cgroup_name", cgroup_name, "its VMs' cgroups"),
        ):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise DriverError(f"cannot open the host-name lock {path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Holder.parse(os.pread(fd, HOLDER_MAX_BYTES, 0).decode(errors="replace"))
                os.close(fd)
                raise DriverError(
                    f'{section}.{setting} "{value}" is in use by another gateway on this host '
                    f"({holder.describe()}): it names {names}, and each gateway would remove the other's "
                    f"VMs as orphans. {advice}"
                ) from None
            fds.append(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me.__dict__).encode(), 0)
        for holder in _live_holders(root, {prefix_path, cgroup_path}):
            if holder.cidr and _overlap(holder.cidr, cidr):
                raise DriverError(
                    f"{section}.cidr {cidr} overlaps {holder.section}.cidr {holder.cidr} of another "
                    f"gateway on this host ({holder.describe()}): the two would route requests to each "
                    f"other's VMs. {advice}"
                )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return OwnerLock(fds)


def _live_holders(root: Path, own: set[Path]) -> Iterator[Holder]:
    """The holders of the other lock files that a live process holds (a shared lock cannot be had)."""
    for path in sorted(root.glob(f"*{LOCK_SUFFIX}")):
        if path in own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                yield Holder.parse(os.pread(fd, HOLDER_MAX_BYTES, 0).decode(errors="replace"))
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)  # nobody's: a dead gateway's file
        finally:
            os.close(fd)


def _overlap(a: str, b: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_network(a, strict=False).overlaps(ipaddress.ip_network(b, strict=False))
    return False
