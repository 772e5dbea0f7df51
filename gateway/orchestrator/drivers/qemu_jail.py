"""How each QEMU of the qemu driver is confined, so that a guest which escapes into QEMU is not host root.

Every QEMU (each VM's, and the KVM probe's) runs:
- under QEMU's own seccomp filter, ``-sandbox on`` with obsolete system calls, set*id, fork/exec and
  scheduler/affinity calls denied (``SANDBOX``);
- as an unprivileged uid/gid of its own, one per VM slot (``id_base + 1 + slot``; the probe
  ``id_base``), with no supplementary groups, no capabilities (bounding set emptied too) and
  no_new_privs;
- chrooted in a mount namespace of its own holding nothing but the host's ``/usr`` (read-only: QEMU's
  binary, libraries and firmware), ``/dev/null``, ``zero``, ``random``, ``urandom`` (and ``net/tun``,
  ``kvm`` when it uses them), the boot image's kernel and initramfs and the VM's image disk (all
  read-only), a copy of its fw_cfg file, the folder of its control socket and its volume staging folder
  (``/volumes``, its 9p share: ``volmount``); no ``/sys``, ``/etc``, data folder or other VM. ``/proc``
  only as far as 9p needs it (QEMU 7.2 changes a file's mode through ``/proc/self/fd``): process
  folders only (``subset=pid``), of its own uid only (``hidepid=invisible``), which is this QEMU alone.

The mount namespace is a slave of the host's, not private: a volume staged for the VM later reaches
``/volumes`` by propagation, and what the host unmounts (a volume, another VM's mounts) is unmounted
in QEMU's namespace too, instead of being held there, out of sight, until QEMU exits. Nothing QEMU
does propagates back (it could not mount anyway).

Why privileges are dropped before QEMU starts and not with QEMU's ``-runas``/``-chroot``: QEMU 7.2
(Debian 12) installs the seccomp filter first and changes uid last, so ``-runas`` under
``elevateprivileges=deny`` (or ``children``) is killed by its own filter on ``setgid`` (SIGSYS). So the
launcher below (root, already in the VM's cgroup and network namespace) builds the jail, opens the
console file, chroots and execs ``setpriv`` to become the slot's uid; QEMU then opens everything it
needs by its path in the jail, and the tap device because ``ip tuntap`` made the slot's uid its owner.

What QEMU may write lives outside the host folders the gateway reads: the console is a file the launcher
opened (QEMU gets the descriptor, ``-add-fd``), snapshots and templates are descriptors the gateway passes
over QMP (``getfd``). The one host folder QEMU can write is the one of its control socket, and the
gateway connects to that socket without following links (``open_socket``), so a QEMU that planted a
link there cannot make the gateway talk to another VM's QEMU or touch any other file.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.errors import DriverError

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
MAX_HOST_ID = 2**32 - 2
# Below this are the host's own system and login ids.
MIN_ID_BASE = 65536
# What QEMU's command line names, as seen inside the jail.
KERNEL = "/image/kernel"
INITRD = "/image/initrd"
# The VM's image (its root file system, ``qemu_disk``), read-only.
DISK = "/image/disk"
# The VM's volume staging folder: QEMU's 9p share.
VOLUMES = "/volumes"
FW_CFG_FILE = "/vm/config"
QMP_SOCKET = "/vm/qmp/qmp.sock"
# The console file, opened by the launcher and handed to QEMU as this descriptor (QEMU's fd set 1).
CONSOLE_FD = 3
CONSOLE = ["-add-fd", f"fd={CONSOLE_FD},set=1", "-serial", "file:/dev/fdset/1"]
SOCKET_WAIT_S = 10.0
SOCKET_POLL_S = 0.01
# Run by root in the VM's cgroup and network namespace, in a mount namespace of its own (``unshare``),
# with: the jail folder (empty, on the host), uid:gid, kernel, initrd, console file, fw_cfg file or "",
# QMP folder or "", "kvm" or "", image disk or "", volume staging folder or "", then the command
# (setpriv ... qemu ...) to run chrooted there.
# The jail is a tmpfs over that folder: what is mounted there exists in this namespace only, and goes
# when QEMU exits. Its root is read-only once built. The devices every program may open are the host's
# own nodes; /dev/net/tun and /dev/kvm (often root's alone on the host) are nodes of the jail's own,
# owned by QEMU's uid.
JAIL_SCRIPT = r"""
set -eu
jail=$1 ids=$2 kernel=$3 initrd=$4 console=$5 config=$6 qmp=$7 accel=$8 disk=$9 volumes=${10}
shift 10
mount -t tmpfs -o mode=0755,size=1m,nosuid,noexec gateway-qemu "$jail"
cd "$jail"
for name in bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$name" ]; then
        ln -s "$(readlink "/$name")" "$name"
    elif [ -d "/$name" ]; then
        mkdir "$name"
        mount -o bind,ro,nosuid,nodev "/$name" "$name"
    fi
done
mkdir usr dev image vm
mount -o bind,ro,nosuid,nodev /usr usr
for node in null zero random urandom; do
    : > "dev/$node"
    mount -o bind "/dev/$node" "dev/$node"
done
if [ -n "$qmp" ]; then
    mkdir dev/net
    mknod -m 0600 dev/net/tun c 10 200
    chown "$ids" dev/net/tun
    mkdir vm/qmp
    mount -o bind,nosuid,nodev,noexec "$qmp" vm/qmp
fi
if [ "$accel" = kvm ]; then
    mknod -m 0600 dev/kvm c 10 232
    chown "$ids" dev/kvm
fi
: > image/kernel
mount -o bind,ro,nosuid,nodev "$kernel" image/kernel
: > image/initrd
mount -o bind,ro,nosuid,nodev "$initrd" image/initrd
if [ -n "$disk" ]; then
    : > image/disk
    mount -o bind,ro,nosuid,nodev "$disk" image/disk
fi
if [ -n "$volumes" ]; then
    mkdir volumes proc
    mount -o bind,nosuid,nodev "$volumes" volumes
    mount -t proc -o nosuid,nodev,noexec,hidepid=invisible,subset=pid gateway-qemu-proc proc
fi
if [ -n "$config" ]; then
    cp "$config" vm/config
    chown "$ids" vm/config
    chmod 0400 vm/config
fi
exec 3>>"$console"
mount -o remount,bind,ro "$jail"
exec chroot . "$@"
"""
# The programs the launcher runs on the host (util-linux and coreutils).
HOST_TOOLS = ("unshare", "mount", "mknod", "chroot", "setpriv")


def vm_ids(id_base: int, slot: int) -> int:
    """The host uid (and gid) of the QEMU of a VM in this slot."""
    return id_base + 1 + slot


def probe_ids(id_base: int) -> int:
    """The KVM probe's uid/gid: not any slot's, so a probe never shares a uid with a VM."""
    return id_base


def check_ids(id_base: int, slots: int) -> None:
    """The QEMUs' ids (the probe's and ``slots`` VMs') must be unprivileged and nobody else's: a process
    of another user with the same uid could signal or trace a VM's QEMU. (Account and subordinate-id
    databases are checked; other drivers' ids are configuration: netns.id_base is 1e9 by default.)"""
    top = id_base + slots
    if id_base < MIN_ID_BASE or top > MAX_HOST_ID:
        raise DriverError(
            f"qemu.id_base: the QEMUs' ids {id_base}..{top} must lie in {MIN_ID_BASE}..{MAX_HOST_ID}"
        )
    ours = range(id_base, top + 1)
    for entry in pwd.getpwall():
        if entry.pw_uid in ours:
            raise DriverError(
                f"qemu.id_base: uid {entry.pw_uid} ({entry.pw_name}) is an account of this host"
            )
    for group in grp.getgrall():
        if group.gr_gid in ours:
            raise DriverError(f"qemu.id_base: gid {group.gr_gid} ({group.gr_name}) is a group of this host")
    for database in (Path("/etc/subuid"), Path("/etc/subgid")):
        for owner, start, count in subordinate_ranges(database):
            if start < ours.stop and ours.start < start + count:
                raise DriverError(
                    f"qemu.id_base: ids {id_base}..{top} overlap {owner}'s range in {database} "
                    f"({start}..{start + count - 1}); choose another qemu.id_base"
                )


def subordinate_ranges(path: Path) -> list[tuple[str, int, int]]:
    """(owner, first id, count) lines of /etc/subuid or /etc/subgid (none when it is missing)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    ranges = []
    for line in text.splitlines():
        owner, _, rest = line.strip().partition(":")
        start, _, count = rest.partition(":")
        if start.isdigit() and count.isdigit():
            ranges.append((owner, int(start), int(count)))
    return ranges


def host_tools(qemu_binary: str) -> tuple[str, str]:
    """(QEMU, setpriv) as absolute paths, checked: both must be in ``/usr``, the jail's one host folder."""
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if missing:
        raise DriverError(f"confining QEMU needs {', '.join(missing)} (util-linux, coreutils)")
    found = []
    for tool in (qemu_binary, "setpriv"):
        path = os.path.realpath(shutil.which(tool) or tool)
        if not path.startswith("/usr/"):
            raise DriverError(f"{path}: a confined QEMU sees /usr only, so {tool} must be installed there")
        found.append(path)
    return found[0], found[1]


def readable_by_all(path: Path) -> None:
    """The boot image and image disks are opened by the unprivileged QEMU (they hold no secrets)."""
    try:
        mode = path.stat().st_mode
        if mode & 0o044 != 0o044:
            path.chmod(stat.S_IMODE(mode) | 0o044)
    except OSError as exc:
        raise DriverError(f"{path} must be readable by every user (QEMU runs unprivileged): {exc}") from None


def launcher(
    *,
    jail: Path,
    ids: int,
    kernel: Path,
    initrd: Path,
    console: Path,
    fw_cfg: Path | None,
    qmp_dir: Path | None,
    accel: str,
    setpriv: str,
    disk: Path | None = None,
    volumes: Path | None = None,
) -> list[str]:
    """argv prefix (root) that builds the jail and runs what follows in it as ``ids``, without privileges.

    ``jail`` must be an empty folder, ``console`` an existing file (QEMU writes it through a descriptor),
    ``qmp_dir`` (a VM's; the probe has none) a folder owned by ``ids``; ``disk`` (a VM's; the probe has
    none) the image disk it attaches read-only; ``volumes`` (a VM's) its volume staging folder.
    """
    return [
        "unshare",
        "--mount",
        "--propagation",
        "slave",
        "sh",
        "-c",
        JAIL_SCRIPT,
        "gateway-qemu-jail",
        str(jail),
        f"{ids}:{ids}",
        str(kernel),
        str(initrd),
        str(console),
        str(fw_cfg or ""),
        str(qmp_dir or ""),
        "kvm" if accel == "kvm" else "",
        str(disk or ""),
        str(volumes or ""),
        setpriv,
        f"--reuid={ids}",
        f"--regid={ids}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]


@contextlib.contextmanager
def open_socket(
    path: Path,
    owner: int,
    *,
    alive: Callable[[], bool] = lambda: True,
    timeout_s: float = SOCKET_WAIT_S,
) -> Iterator[Path]:
    """A path to connect to the unix socket ``path`` that is safe when its folder is QEMU's to write.

    The socket is opened without following links (``O_PATH | O_NOFOLLOW``) and must be a socket owned by
    ``owner``; the caller connects to ``/proc/self/fd/N``, which is that very inode whatever happens to
    the name meanwhile. Waits for the socket to appear (QEMU binds it while it starts) while ``alive()``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            break
        except FileNotFoundError:
            if not alive():
                raise DriverError(f"QEMU exited before it opened its control socket {path}") from None
            if time.monotonic() >= deadline:
                raise DriverError(f"QEMU's control socket {path} did not appear") from None
            time.sleep(SOCKET_POLL_S)
    try:
        found = os.fstat(fd)
        if not stat.S_ISSOCK(found.st_mode) or found.st_uid != owner:
            raise DriverError(f"{path} is not the control socket of this VM's QEMU (uid {owner})")
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
