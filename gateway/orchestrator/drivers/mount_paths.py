"""Pure: where in a VM a volume may be mounted, and the names the drivers give a mount.

A ``mount_path`` is absolute and already normal (no ``.`` or ``..`` component, no empty component, no
trailing slash: what you see is where it goes), at most ``MAX_PATH_CHARS`` with components of at most
``MAX_NAME_BYTES``, and neither ``/`` nor a system folder or anything beneath one (``RESERVED``): a
volume over ``/proc``, ``/dev``, ``/etc`` or ``/usr`` would hide or replace what the VM's kernel
interfaces and programs are, and ``STAGING_DIR`` is where the drivers bring volumes into the VM.

Ownership: a volume's files are stored as the VM's root sees them: uid/gid 0 is the VM's root
(``VOLUME_ROOT_IDS``), 1000 its first user. Both drivers shift ids per VM with an idmapped mount, so one
volume serves VMs of any slot unchanged: netns maps on-disk 0..65535 to the slot's host range (the VM's
user namespace), qemu maps on-disk 0 to the slot's QEMU uid (which then acts for the guest's root).
"""

from __future__ import annotations

import hashlib

# Where the drivers bring volumes into a VM (netns: a propagation point; qemu: the 9p share's mount).
STAGING_DIR = "/.sandbox-volumes"
RESERVED = (
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/boot",
    "/run",
    STAGING_DIR,
)
MAX_PATH_CHARS = 1024
MAX_NAME_BYTES = 255
# The owner (uid, gid) of a fresh volume's root folder on the host: the VM's root (see the docstring).
VOLUME_ROOT_IDS = (0, 0)
VOLUME_ROOT_MODE = 0o755


def check_mount_path(path: str) -> str:
    """``path`` if a volume may be mounted there; ValueError saying why not otherwise."""
    if not isinstance(path, str) or not path:
        raise ValueError("mount_path must be a non-empty string")
    if "\x00" in path or any(ord(c) < 0x20 for c in path):
        raise ValueError("mount_path must not contain control characters")
    if not path.startswith("/"):
        raise ValueError(f"mount_path {path!r} must be absolute")
    if len(path) > MAX_PATH_CHARS:
        raise ValueError(f"mount_path is longer than {MAX_PATH_CHARS} characters")
    if path == "/":
        raise ValueError("mount_path / would hide the VM's whole root file system")
    names = path[1:].split("/")
    for name in names:
        if name in ("", ".", ".."):
            raise ValueError(f"mount_path {path!r} must be normal: no empty, '.' or '..' component")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"mount_path {path!r} has a component longer than {MAX_NAME_BYTES} bytes")
    for reserved in RESERVED:
        if path == reserved or path.startswith(reserved + "/"):
            raise ValueError(f"mount_path {path!r} is in {reserved}, a system folder of the VM")
    return path


def components(path: str) -> list[str]:
    """The names of a checked ``mount_path``, from the root down."""
    return check_mount_path(path)[1:].split("/")


def mount_key(path: str) -> str:
    """The name of a mount's staging folder: one per ``mount_path`` in a VM, derived so that ``unmount``
    finds it from the path alone (drivers keep no state)."""
    return hashlib.sha256(check_mount_path(path).encode()).hexdigest()[:16]
