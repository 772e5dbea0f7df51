"""The compiled edge is a twin of this package: the same sources, compiled by mypyc as ``gateway._edgec``.

Its build (``setup.py``) copies the modules below there and records their hash; the edge loads the
twin only while the hash still matches these sources, so an edited module is never run from a stale
build. Nothing here imports the gateway: the build loads this file on its own.

Written for both: mypyc trusts the types mypy infers, narrowing included. An attribute checked
against None early in a method stays narrowed after calls that may change it, and compiled code then
skips a later check (or fails it with a TypeError); such methods check locals, or ask a small method
(mypy's warn_unreachable, on for gateway.edge, reports the first kind). Classes typed as a Protocol
are called through Python's attribute lookup; the hot path's own classes are typed concretely (type-only
imports where the modules would otherwise import each other) so their calls are direct. And
``haystack.find(needle) >= 0`` stands for ``needle in haystack`` on bytes: CPython 3.11's bytes ``in``
first tries the needle as an integer and raises and clears a TypeError inside, every time (about 3,700
instructions, measured with callgrind: twice per request in routing alone).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

COMPILED_PACKAGE = "gateway._edgec"
# The edge's hot path and everything it calls per request; relative imports between them keep each
# twin to itself. server.py (the listener) and the selection stay interpreted: they run once.
MODULES = (
    "access", "deadline", "exchange", "headers", "observe", "pages", "protocol", "pump", "ratelimit",
    "resolver", "routing", "settings", "signed", "target", "tunnel", "upstream", "websocket",
)  # fmt: skip
# Written in Cython (``.pyx`` here), built into the compiled twin too: its HTTP/1.1 parsers over llhttp.
C_MODULES = ("http1c",)
EDGE_DIR = Path(__file__).resolve().parent


def source_hash(edge_dir: Path = EDGE_DIR) -> str:
    """One hash of the twin's sources, in order."""
    digest = hashlib.sha256()
    for name in MODULES:
        digest.update(name.encode() + b"\0" + (edge_dir / f"{name}.py").read_bytes() + b"\0")
    for name in C_MODULES:
        digest.update(name.encode() + b"\0" + (edge_dir / f"{name}.pyx").read_bytes() + b"\0")
    return digest.hexdigest()
