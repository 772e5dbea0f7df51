"""The SNI table: which certificate answers a TLS handshake. Memory only: a handshake never waits on Redis
or disk.

Choice: the exact name, then a wildcard for the name minus its first label (one label only, as browsers
match), then the default certificate, which names no customer. The table is replaced entry by entry
(``put``, ``remove``) while handshakes go on; each handshake reads one consistent dict.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup_names(server_name: str) -> tuple[str, ...]:
    """The table keys that may answer ``server_name``, best first."""
    name = server_name.rstrip(".").lower()
    first, dot, parent = name.partition(".")
    if not dot or not first or not parent:
        return (name,)
    return (name, "*." + parent)


def choose(table: Mapping[str, T], server_name: str | None) -> T | None:
    if not server_name:
        return None
    for name in lookup_names(server_name):
        found = table.get(name)
        if found is not None:
            return found
    return None


class SniTable:
    """Names -> server SSLContexts, with the default; ``context`` is what the TLS listener is given."""

    def __init__(self, default: ssl.SSLContext, alpn: tuple[str, ...] = ("http/1.1",)) -> None:
        # What the listener offers in ALPN (h2 first when HTTP/2 is on), set on every context it serves:
        # the context chosen by SNI is the one whose ALPN list the handshake uses.
        self.alpn = alpn
        default.set_alpn_protocols(list(alpn))
        self.default = default
        self._by_name: dict[str, ssl.SSLContext] = {}
        # certificate id -> the names it serves and its context
        self._served: dict[str, tuple[tuple[str, ...], ssl.SSLContext]] = {}
        default.sni_callback = self._on_server_name

    @property
    def context(self) -> ssl.SSLContext:
        return self.default

    def put(self, cert_id: str, names: tuple[str, ...], context: ssl.SSLContext) -> None:
        """Serve ``context`` for ``names`` from now on (replacing what ``cert_id`` served before)."""
        context.set_alpn_protocols(list(self.alpn))
        by_name = self._without(cert_id)
        for name in names:
            by_name[name] = context
        self._served[cert_id] = (names, context)
        self._by_name = by_name  # one assignment: a handshake sees the old table or the new one

    def remove(self, cert_id: str) -> None:
        self._by_name = self._without(cert_id)
        self._served.pop(cert_id, None)

    def _without(self, cert_id: str) -> dict[str, ssl.SSLContext]:
        by_name = dict(self._by_name)
        names, context = self._served.get(cert_id, ((), None))
        for name in names:
            if by_name.get(name) is context:  # not a name another certificate took over since
                del by_name[name]
        return by_name

    def cert_ids(self) -> set[str]:
        return set(self._served)

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        return choose(self._by_name, server_name) or self.default

    def _on_server_name(self, ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        # Remembered on the connection: the edge answers 421 when the request's Host is another name.
        ssl_object.sni_name = server_name  # type: ignore[attr-defined]
        chosen = choose(self._by_name, server_name)
        if chosen is not None:
            ssl_object.context = chosen
