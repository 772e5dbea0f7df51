"""Reads and writes one file inside a VM, for the files API (``POST /upload``, ``POST /download``).

It runs in the VM, as the VM's user, like any command (``python3 -c <this file> read|write PATH ROOT``),
so a path means what it means to the VM's own programs: its root, its mounts, its permissions. Standard
library only: the image has nothing else. stdin (write) and stdout (read) carry the bytes; the first
line of stdout is a JSON header: ``{"size", "path"}`` on success, ``{"error", "status"}`` on failure.
What is written comes in frames (a 4-byte big-endian length, then that many bytes) ended by an empty
one: stdin closing before it means the upload was cut, and the half-written file is removed, never
renamed into place.

Refused with a clear status, whatever the VM holds: a ``..`` segment (400), the kernel's special file
systems (/proc, /sys, /dev: 403), a path that resolves outside ``ROOT`` (403: the development driver's
VMs share the host's files, so there ROOT is the VM's own folder), and anything but a regular file (409).
A file is written to a temporary name beside it and renamed into place, so a reader never sees half of
it and a symlink at the path is replaced, never followed.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import BinaryIO

CHUNK = 1 << 16
MAX_PATH = 4096
SPECIAL = ("/proc", "/sys", "/dev")


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Cut(Exception):
    """stdin ended before the closing empty frame."""


def exactly(src: BinaryIO, n: int) -> bytes:
    data = src.read(n)
    while len(data) < n:
        more = src.read(n - len(data))
        if not more:
            raise Cut()
        data += more
    return data


def header(out: BinaryIO, **fields: object) -> None:
    out.write(json.dumps(fields).encode() + b"\n")
    out.flush()


def inside(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def checked(path: str, root: str) -> str:
    """The absolute path the VM means, refused if it is not a plain path to a place files may go."""
    if not path or len(path) > MAX_PATH or "\0" in path:
        raise Refused(400, "path must be 1 to 4096 characters without NUL")
    if ".." in path.split("/"):
        raise Refused(400, "path must not contain '..' segments")
    full = os.path.normpath(os.path.join(os.getcwd(), path))
    for special in SPECIAL:
        if full == special or full.startswith(special + "/"):
            raise Refused(403, f"{special} is the kernel's, not a file to transfer")
    if not inside(full, root):
        raise Refused(403, "path is outside the VM's files")
    return full


def resolved_inside(path: str, root: str) -> str:
    real = os.path.realpath(path)
    if not inside(real, root):
        raise Refused(403, "path leads outside the VM's files (a symlink)")
    for special in SPECIAL:
        if real == special or real.startswith(special + "/"):
            raise Refused(403, f"path leads into {special} (a symlink)")
    return real


def read(path: str, root: str, out: BinaryIO) -> None:
    real = resolved_inside(checked(path, root), root)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Refused(404, "no such file") from None
    except PermissionError:
        raise Refused(403, "permission denied") from None
    except OSError as exc:
        raise Refused(409, f"cannot open: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise Refused(409, "not a regular file (a directory, device, FIFO or socket)")
    with os.fdopen(fd, "rb", buffering=0) as src:
        os.set_blocking(fd, True)
        header(out, size=info.st_size, path=real)
        sent = 0
        # Exactly the size announced: a file that grows meanwhile is cut there, one that shrinks ends early
        # (the reader sees fewer bytes than announced, and the host reports it).
        while sent < info.st_size:
            chunk = src.read(min(CHUNK, info.st_size - sent))
            if not chunk:
                break
            out.write(chunk)
            sent += len(chunk)
        out.flush()


def write(path: str, root: str, src: BinaryIO, out: BinaryIO) -> None:
    full = checked(path, root)
    parent = os.path.dirname(full)
    try:
        os.makedirs(parent, exist_ok=True)
    except FileExistsError:
        raise Refused(409, "a parent of the path is not a directory") from None
    except PermissionError:
        raise Refused(403, "permission denied creating the parent folder") from None
    except NotADirectoryError:
        raise Refused(409, "a parent of the path is not a directory") from None
    parent = resolved_inside(parent, root)
    target = os.path.join(parent, os.path.basename(full))
    try:
        current = os.lstat(target)
    except FileNotFoundError:
        current = None
    if current is not None and not (stat.S_ISREG(current.st_mode) or stat.S_ISLNK(current.st_mode)):
        raise Refused(409, "the path exists and is not a regular file")
    temp = os.path.join(parent, f".{os.path.basename(full)}.upload-{os.getpid()}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except PermissionError:
        raise Refused(403, "permission denied") from None
    size = 0
    try:
        with os.fdopen(fd, "wb") as dst:
            while True:
                length = int.from_bytes(exactly(src, 4), "big")
                if length == 0:
                    break
                dst.write(exactly(src, length))
                size += length
        os.rename(temp, target)
    except Cut:
        os.unlink(temp)
        raise Refused(400, "the upload was cut short") from None
    except OSError as exc:
        os.unlink(temp)
        if exc.errno == 28:  # ENOSPC
            raise Refused(507, "no space left in the VM") from None
        raise Refused(409, f"cannot write: {exc.strerror}") from None
    header(out, size=size, path=target)


def main() -> None:
    op, path, root = sys.argv[1:4]
    root = os.path.realpath(root)  # "." (the working folder) or "/"
    out = sys.stdout.buffer
    try:
        if op == "read":
            read(path, root, out)
        elif op == "write":
            write(path, root, sys.stdin.buffer, out)
        else:
            raise Refused(400, f"unknown operation {op}")
    except Refused as exc:
        header(out, error=str(exc), status=exc.status)
        sys.exit(3)


if __name__ == "__main__":
    main()
