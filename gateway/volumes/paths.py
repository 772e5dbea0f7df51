"""Pure rules for names under a volume: paths that come from API users, holders and ids that become
file names on the host. No I/O."""

from __future__ import annotations

import hashlib
import re

MAX_PATH_CHARS = 4096
MAX_COMPONENT_BYTES = 255  # NAME_MAX of ext4
# Ids the store is given become file names: a strict grammar, so none can climb or hide.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")


class PathProblem(ValueError):
    """Why a path given for a volume cannot name anything inside it."""


def is_safe_id(value: str) -> bool:
    return bool(_ID.match(value))


def holder_slug(holder: str) -> str:
    """A file-name-safe stand-in for any holder string (a VM id, ``vm:/mnt/x``...), stable across runs."""
    return hashlib.sha256(holder.encode()).hexdigest()[:24]


def components(path: str, *, allow_root: bool = False) -> tuple[str, ...]:
    """A volume path as its components, relative to the volume's root.

    A leading ``/`` means the volume's root (``/a/b`` is ``a/b``); ``.`` and empty components are dropped;
    ``..`` anywhere is refused (never resolved: what it would climb past may be a symlink), and so are NUL,
    over-long paths and components. The root itself (no components) only where ``allow_root``.
    """
    if len(path) > MAX_PATH_CHARS:
        raise PathProblem(f"a path is at most {MAX_PATH_CHARS} characters")
    if "\0" in path:
        raise PathProblem("a path cannot hold NUL")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise PathProblem("'..' is not allowed in a volume path")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise PathProblem(f"a path component is at most {MAX_COMPONENT_BYTES} bytes")
        parts.append(part)
    if not parts and not allow_root:
        raise PathProblem("the path names the volume's root, not a file")
    return tuple(parts)


def prefix_start(prefix: str) -> tuple[tuple[str, ...], str]:
    """Where a listing by ``prefix`` starts: the directory every match is under, and what the names in it
    must start with (``"logs/app"`` -> ``(("logs",), "app")``; ``"logs/"`` -> ``(("logs",), "")``)."""
    head, _, tail = prefix.rpartition("/")
    if tail in (".", ".."):
        head, tail = prefix, ""
    return components(head, allow_root=True), tail


def joined(parts: tuple[str, ...]) -> str:
    return "/".join(parts)
