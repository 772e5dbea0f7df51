"""Files in an attached volume, for the API (no VM): list, write, read, delete, blocking (run them in
threads).

The tree may have been shaped by a VM, so nothing here follows a symlink: every path is walked from the
volume's root one component at a time with ``openat(O_NOFOLLOW)`` (a symlink anywhere is refused, a
directory swapped for a link between two steps is caught by the next ``O_NOFOLLOW``), and ``..`` never
reaches this far (``paths.components``). Writes go to a temporary file beside the target and are renamed
over it once complete and flushed: a cut upload leaves nothing, a finished one survives a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import BadRequest, Conflict, NotFound
from gateway.volumes.paths import joined
from gateway.volumes.store import InsufficientStorage

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
TMP_PREFIX = ".upload-"
READ_BYTES = 256 * 1024


class SymlinkRefused(Conflict):
    code, message = "symlink_refused", "the path goes through a symlink: refused"


class NotAFile(Conflict):
    code, message = "not_a_regular_file", "not a regular file"


class FileMissing(NotFound):
    code, message = "file_not_found", "no such file in the volume"


class InvalidPath(BadRequest):
    code, message = "invalid_path", "invalid path"


def _refusal(exc: OSError, where: tuple[str, ...]) -> Exception:
    name = joined(where) or "/"
    if exc.errno == errno.ELOOP:
        return SymlinkRefused(f"{name} is a symlink: refused")
    if exc.errno == errno.ENOENT:
        return FileMissing(f"{name}: no such file or directory in the volume")
    if exc.errno == errno.ENOTDIR:
        return NotAFile(f"{name} is not a directory")
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return InsufficientStorage()
    return exc


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_root(root: Path) -> int:
    return os.open(root, DIR_FLAGS)


def open_dir(
    root_fd: int, parts: tuple[str, ...], *, create: bool = False, owner: tuple[int, int] | None = None
) -> int:
    """A descriptor of the directory ``parts`` under ``root_fd`` (made, owned by ``owner``, if
    ``create``), never through a symlink."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    if owner is not None:
                        os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            try:
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOTDIR and _is_link(fd, part):
                    # O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR: name it for what it is.
                    raise SymlinkRefused(f"{joined(parts[: i + 1])} is a symlink: refused") from None
                raise _refusal(exc, parts[: i + 1]) from None
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


@dataclass
class Entry:
    path: str
    type: str  # file, directory, symlink, other
    size: int
    modified_at: float

    def view(self) -> dict[str, Any]:
        return {"path": self.path, "type": self.type, "size": self.size, "modified_at": self.modified_at}


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def list_tree(
    root: Path, start: tuple[str, ...], name_prefix: str, *, recursive: bool, limit: int
) -> list[Entry]:
    """Entries under ``start`` whose first name starts with ``name_prefix``, depth first in name order,
    at most ``limit``; symlinks are listed, never followed. A missing start lists nothing."""
    found: list[Entry] = []
    root_fd = open_root(root)
    try:
        try:
            fd = open_dir(root_fd, start)
        except (FileMissing, NotAFile):
            return []
        _walk(fd, start, name_prefix, recursive, limit, found)
    finally:
        os.close(root_fd)
    return found


def _walk(
    fd: int, where: tuple[str, ...], name_prefix: str, recursive: bool, limit: int, found: list[Entry]
) -> None:
    try:
        names = sorted(os.listdir(fd))
        for name in names:
            if len(found) >= limit:
                return
            if not name.startswith(name_prefix) or (not where and name == "lost+found"):
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            kind = _kind(st.st_mode)
            found.append(
                Entry(joined((*where, name)), kind, st.st_size if kind == "file" else 0, st.st_mtime)
            )
            if recursive and kind == "directory":
                try:
                    sub = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue  # swapped for a link, or gone, since the stat
                _walk(sub, (*where, name), "", recursive, limit, found)
    finally:
        os.close(fd)


class Writer:
    """A file being uploaded: a temporary file in the target's directory until ``commit``."""

    def __init__(self, root: Path, parts: tuple[str, ...], owner: tuple[int, int] | None) -> None:
        self.dir_fd = open_parent(root, parts, create=True, owner=owner)
        self.parts = parts
        self.name = parts[-1]
        self.tmp = TMP_PREFIX + secrets.token_hex(8)
        try:
            self.fd = os.open(
                self.tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=self.dir_fd,
            )
            if owner is not None:
                os.fchown(self.fd, *owner)
        except BaseException:
            os.close(self.dir_fd)
            raise
        self.size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                done = os.write(self.fd, view)
                view = view[done:]
                self.size += done
        except OSError as exc:
            raise _refusal(exc, self.parts) from None

    def commit(self, *, overwrite: bool) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise _refusal(exc, self.parts) from None
        try:
            if overwrite:
                try:
                    st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    if stat.S_ISDIR(st.st_mode):
                        raise NotAFile(f"{joined(self.parts)} is a directory")
                # A symlink there is replaced itself, never written through.
                os.replace(self.tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            else:
                try:
                    os.link(
                        self.tmp,
                        self.name,
                        src_dir_fd=self.dir_fd,
                        dst_dir_fd=self.dir_fd,
                        follow_symlinks=False,
                    )
                except FileExistsError:
                    raise Conflict(
                        f"{joined(self.parts)} exists (upload with overwrite=true to replace it)",
                        code="file_exists",
                    ) from None
                os.unlink(self.tmp, dir_fd=self.dir_fd)
            os.fsync(self.dir_fd)
        except OSError as exc:
            raise _refusal(exc, self.parts) from None

    def close(self) -> None:
        """Release the descriptors; the temporary file goes unless it was committed."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.tmp, dir_fd=self.dir_fd)
        os.close(self.dir_fd)


def open_parent(
    root: Path, parts: tuple[str, ...], *, create: bool = False, owner: tuple[int, int] | None = None
) -> int:
    """The folder that holds ``parts[-1]``, walked from the volume's root (``open_dir``)."""
    root_fd = open_root(root)
    try:
        return open_dir(root_fd, parts[:-1], create=create, owner=owner)
    finally:
        os.close(root_fd)


def open_file(root: Path, parts: tuple[str, ...]) -> tuple[int, int]:
    """A regular file for reading, never through a symlink, never blocking on a FIFO: (fd, size)."""
    dir_fd = open_parent(root, parts)
    try:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            raise _refusal(exc, parts) from None
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotAFile(f"{joined(parts)} is not a regular file")
    os.set_blocking(fd, True)
    return fd, st.st_size


def read_chunks(fd: int, size: int) -> Iterator[bytes]:
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(READ_BYTES, size - offset), offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def delete(root: Path, parts: tuple[str, ...]) -> None:
    """A file or symlink (the link itself), or an empty directory."""
    dir_fd = open_parent(root, parts)
    try:
        try:
            st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(parts[-1], dir_fd=dir_fd)
            else:
                os.unlink(parts[-1], dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise Conflict(
                    f"{joined(parts)} is a directory that is not empty", code="directory_not_empty"
                ) from None
            raise _refusal(exc, parts) from None
    finally:
        os.close(dir_fd)
