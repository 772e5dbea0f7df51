"""Route resolution for the edge: app target -> the VM's address, from Redis, behind a per-process cache.

Positive and negative answers are cached for a short time; the events channel (VM ended, port exposed)
drops entries at once, so a killed VM stops receiving new requests on every edge as soon as its event
arrives (and within the positive TTL if the event is lost). While the subscription is down the cache is
bypassed, so a missed event can never keep a dead route alive.

Only addresses inside the configured VM networks are returned: a corrupt or hostile record can never make
the edge dial anything else.

Redis down: a lookup that fails falls back to what the cache last knew of that target (even past its
TTL) for ``stale_grace_s`` from the first failure, so apps keep being served through a short outage or a
failover (while Redis is down nothing can change a route: every change is written there first). After
the grace the edge fails closed (503). While lookups fail, Redis is tried again at most every
``RETRY_AFTER_FAILURE_S`` per process; in between, requests get the stale answer at once instead of
each waiting for Redis's timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from gateway.errors import StoreUnavailable
from gateway.ids import is_session_id, is_vm_id
from gateway.state.events import (
    DomainChanged,
    Event,
    OrgKeysChanged,
    PortExposed,
    ShareChanged,
    UrlKeyChanged,
    VmChanged,
)
from gateway.state.ports import HOST_LOCALHOST, VM_SUSPENDED, RouteSource, VmRecord
from gateway.tokens import cookie_scope, cookie_values

from .target import key_parts, route_key
from .upstream import UpstreamAddress

log = logging.getLogger(__name__)

POSITIVE_TTL_S: Final = 2.0
NEGATIVE_TTL_S: Final = 1.0
MAX_ENTRIES: Final = 100_000
RETRY_AFTER_FAILURE_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Route:
    vm_id: str
    session_id: str
    ip: str
    port: int
    expires_at: float | None
    # SHA-256 hashes of the tokens that open it: a private share's token, or every API key of the
    # instance's organisation. None: public.
    tokens: frozenset[str] | None = None
    # An instance also takes its organisation's key as Authorization: Bearer (then not forwarded).
    bearer: bool = False
    # The edge cookies that open it (gateway.tokens.cookie_values), when private.
    cookies: frozenset[bytes] = frozenset()
    # Its VM is suspended (and wakes on a request when auto_resume).
    suspended: bool = False
    auto_resume: bool = False
    # The Host the app sees instead of the public one (its share's "localhost" policy): b"localhost:<port>".
    app_host: bytes | None = None
    # Its VM's URL-signing key and version (signed URLs, edge.signed); None: it has signed none. And the
    # share opening the port (what a share's signed URLs grant).
    url_key: bytes | None = None
    url_key_version: int = 0
    share_id: str | None = None
    # Its VM's own cap on exchanges (requests in flight and tunnels) per edge process; 0: none of its own.
    max_exchanges: int = 0
    # Where the edge dials it (and the pool's key), made once with the route.
    upstream: UpstreamAddress = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "upstream", UpstreamAddress(self.vm_id, self.ip, self.port))  # (frozen)


# target.route_key: by ("s", session id, port), ("v", VM id, port), ("d", custom domain, 0) or
# ("i", instance id, 0)
CacheKey = str
# A custom domain serves its VM's share port, or this one when the VM shares none.
DEFAULT_DOMAIN_PORT: Final = 80
MISS: Final = object()  # peek(): nothing usable cached
# (A Final alias: the compiled edge calls it without looking up the module's attribute.)
_monotonic: Final = time.monotonic


def _route(vm: VmRecord, port: int, tokens: frozenset[str] | None, *, bearer: bool = False) -> Route:
    cookies = cookie_values(tokens, cookie_scope(vm.vm_id, port)) if tokens else frozenset()
    suspended = vm.status == VM_SUSPENDED
    share = vm.share or {}
    shared = share.get("port") == port
    localhost = shared and share.get("host") == HOST_LOCALHOST
    share_id = share.get("share_id") if shared else None
    return Route(
        vm.vm_id,
        vm.session_id,
        vm.ip,
        port,
        vm.expires_at,
        tokens,
        bearer,
        cookies,
        suspended,
        vm.auto_resume,
        b"localhost:%d" % port if localhost else None,
        _url_key(vm.url_key),
        vm.url_key_version or 0,
        share_id if isinstance(share_id, str) else None,
        vm.max_exchanges or 0,
    )


def _url_key(text: str | None) -> bytes | None:
    """The VM's URL key as bytes; None when it has none (or a malformed one: then nothing is signed)."""
    if not text:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


class Resolver:
    """The route cache; an ``EventSubscriber`` of the process's event feed (``gateway.state.ports``).

    Until the feed says ``connected`` every lookup goes to ``store`` (nothing is cached): only events can
    tell the cache that an answer went stale.
    """

    def __init__(
        self,
        store: RouteSource,
        vm_networks: Iterable[str],
        stale_grace_s: float = 0.0,
        *,
        positive_ttl_s: float = POSITIVE_TTL_S,
    ) -> None:
        self.store = store
        self.positive_ttl_s = positive_ttl_s
        self.stale_grace_s = stale_grace_s
        self._failing_since: float | None = None  # first failed lookup of the current outage
        self._last_failure = 0.0
        self.networks = [ipaddress.ip_network(n) for n in vm_networks]
        self._cache: dict[CacheKey, tuple[float, Route | None]] = {}
        self._by_vm: dict[str, set[CacheKey]] = {}
        self._by_session: dict[str, set[CacheKey]] = {}
        self._subscribed = False
        # Set while the events channel is followed (and the cache is in use).
        self.following = asyncio.Event()
        self._loading: dict[CacheKey, asyncio.Task[Route | None]] = {}
        self._generation = 0
        self.on_vm_gone: list[Callable[[str], None]] = []
        self.on_share_revoked: list[Callable[[str, int], None]] = []
        # Told of a VM whose URL key was rotated (what its old signed URLs opened ends).
        self.on_url_key_rotated: list[Callable[[str], None]] = []
        self.hits = self.misses = self.invalidations = self.stale_hits = 0

    # lookups --------------------------------------------------------------------------------------

    async def by_session(self, session_id: str, port: int) -> Route | None:
        return await self.resolve(route_key("s", session_id, port))

    async def by_vm(self, vm_id: str, port: int) -> Route | None:
        return await self.resolve(route_key("v", vm_id, port))

    def peek(self, key: CacheKey) -> Route | object | None:
        """The cached answer for a route key (``target.route_key``), or MISS.

        Synchronous, so a cache hit costs the edge no task or future.
        """
        if not self._subscribed:
            return MISS
        cached = self._cache.get(key)
        # (An entry lasts no longer than its VM's lifetime: _remember ends it then, so one clock read.)
        if cached is None or cached[0] <= _monotonic():
            return MISS
        self.hits += 1
        return cached[1]

    async def resolve(self, key: CacheKey) -> Route | None:
        cached = self.peek(key)
        if cached is not MISS:
            return cached  # type: ignore[return-value]
        now = time.monotonic()
        self.misses += 1
        if self._failing_since is not None and now - self._last_failure < RETRY_AFTER_FAILURE_S:
            stale = self._stale(key, now)
            if stale is not MISS:
                return stale  # type: ignore[return-value]
        # One Redis lookup per key at a time: a burst of requests after an entry expired shares it.
        generation = self._generation
        pending = self._loading.get(key)
        try:
            if pending is not None:
                return await asyncio.shield(pending)
            task = asyncio.get_running_loop().create_task(self._load(key))
            self._loading[key] = task
            try:
                route = await asyncio.shield(task)
            finally:
                if self._loading.get(key) is task:
                    del self._loading[key]
        except StoreUnavailable:
            failed_at = time.monotonic()
            self._last_failure = failed_at
            if self._failing_since is None:
                self._failing_since = failed_at
            stale = self._stale(key, failed_at)
            if stale is MISS:
                raise
            return stale  # type: ignore[return-value]
        self._failing_since = None
        if self._subscribed and generation == self._generation:
            # Not when an invalidation arrived meanwhile: the answer may predate it (a VM just killed).
            self._remember(key, route, now)
        return route

    async def _load(self, key: CacheKey) -> Route | None:
        kind, ident, port = key_parts(key)
        # One Redis round trip in each case: a miss costs the edge as little Redis as it can.
        exposed = False
        if kind == "i":
            return await self._load_instance(ident)
        if kind == "s":
            if not is_session_id(ident):
                return None
            vm, exposed = await self.store.session_vm_and_port(ident, port)
        elif kind == "v":
            if not is_vm_id(ident):
                return None
            vm, exposed = await self.store.vm_and_port(ident, port)
        else:
            vm = await self.store.domain_vm(ident)
            if vm is None or vm.custom_domain != ident:
                return None  # the domain moved to another VM of its owner: this one is not it
            port = (vm.share or {}).get("port") or DEFAULT_DOMAIN_PORT
        if not self._routable(vm):
            return None
        assert vm is not None
        tokens = None
        if not exposed:
            share = vm.share or {}
            if share.get("port") != port:
                # Only a custom domain reaches a port nobody shared: the customer published it. Else only
                # a signed URL may open it (a private route no token opens), once the VM signs URLs.
                if kind == "d":
                    return _route(vm, port, None)
                return _route(vm, port, frozenset()) if _url_key(vm.url_key) is not None else None
            if not share.get("is_public"):
                token_sha256 = share.get("token_sha256")
                if not isinstance(token_sha256, str):
                    return None  # a private share without a token can never be opened
                tokens = frozenset((token_sha256,))
        return _route(vm, port, tokens)

    async def _load_instance(self, instance_id: str) -> Route | None:
        if not is_session_id(instance_id):
            return None
        instance, vm, key_hashes = await self.store.instance_route(instance_id)
        if instance is None or vm is None or vm.vm_id != instance.vm_id or not self._routable(vm):
            return None
        # Private to the organisation: with no keys left, nobody can open it (an empty set, not None).
        return _route(vm, instance.port, key_hashes, bearer=True)

    def _routable(self, vm: VmRecord | None) -> bool:
        """Active (or suspended: its request may wake it, or is told it sleeps), in range, not expired."""
        if vm is None or not (vm.alive or vm.status == VM_SUSPENDED) or not self._dialable(vm.ip):
            return False
        return vm.expires_at is None or vm.expires_at > time.time()

    def _stale(self, key: CacheKey, now: float) -> Route | object | None:
        """What the cache last knew of ``key`` while Redis fails, within the grace; else MISS."""
        if self._failing_since is None or now - self._failing_since > self.stale_grace_s:
            return MISS
        cached = self._cache.get(key)
        if cached is None:
            return MISS
        route = cached[1]
        if route is not None and route.expires_at is not None and route.expires_at <= time.time():
            return None  # its VM's lifetime is over, outage or not
        self.stale_hits += 1
        return route

    def _dialable(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def _remember(self, key: CacheKey, route: Route | None, now: float) -> None:
        if len(self._cache) >= MAX_ENTRIES:
            self.clear()
        ttl = self.positive_ttl_s if route is not None else NEGATIVE_TTL_S
        until = now + ttl
        if route is not None and route.expires_at is not None:
            # The VM's lifetime ends the entry (peek reads the monotonic clock only).
            until = min(until, now + route.expires_at - time.time())
        self._cache[key] = (until, route)
        if route is not None:
            self._by_vm.setdefault(route.vm_id, set()).add(key)
            self._by_session.setdefault(route.session_id, set()).add(key)
        else:
            kind, ident, _ = key_parts(key)
            if kind == "v":
                self._by_vm.setdefault(ident, set()).add(key)
            elif kind == "s":
                self._by_session.setdefault(ident, set()).add(key)
        # a domain's "no route" is dropped by its own event (handle_event)

    # invalidation ---------------------------------------------------------------------------------

    def clear(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._by_vm.clear()
        self._by_session.clear()

    def forget(self, vm_id: str | None, session_id: str | None) -> None:
        self._generation += 1
        keys: set[CacheKey] = set()
        if vm_id:
            keys |= self._by_vm.pop(vm_id, set())
        if session_id:
            keys |= self._by_session.pop(session_id, set())
        for key in keys:
            if self._cache.pop(key, None) is not None:
                self.invalidations += 1

    def handle(self, event: Event) -> None:
        if isinstance(event, VmChanged):
            self.forget(event.vm_id, event.session_id)
            if event.gone:
                for callback in self.on_vm_gone:
                    callback(event.vm_id)
        elif isinstance(event, OrgKeysChanged):
            # An organisation's keys changed: cached instance routes carry the old set. Rare: drop them all.
            self._generation += 1
            for key in [key for key in self._cache if key.startswith("i ")]:
                if self._cache.pop(key, None) is not None:
                    self.invalidations += 1
        elif isinstance(event, DomainChanged):
            # Claimed, moved or released: whatever was cached for the name is stale.
            self._generation += 1
            if self._cache.pop(route_key("d", event.domain, 0), None) is not None:
                self.invalidations += 1
        elif isinstance(event, ShareChanged) and event.revoked:
            # A share was revoked: the VM's cached routes go, and so do open connections to that port.
            self.forget(event.vm_id, None)
            for revoked in self.on_share_revoked:
                revoked(event.vm_id, event.port)
        elif isinstance(event, UrlKeyChanged):
            # A new key (or the first): routes cached with the old one go, and the VM's "no route" answers
            # (a port only a signed URL opens).
            self.forget(event.vm_id, event.session_id)
            for rotated in self.on_url_key_rotated:
                rotated(event.vm_id)
        elif isinstance(event, PortExposed | ShareChanged):
            # A newly exposed or shared port: cached "no route" answers (by VM or by session) may be wrong
            # now. Rare, so dropping every negative entry is cheaper than indexing them.
            self.forget(event.vm_id, None)
            self._generation += 1
            for key in [key for key, (_, route) in self._cache.items() if route is None]:
                del self._cache[key]

    def connected(self) -> None:
        self.clear()  # anything cached before the subscription may have missed events
        self._subscribed = True
        self.following.set()

    def disconnected(self) -> None:
        # The cache stays for stale answers while Redis fails (it is bypassed while unsubscribed, and
        # emptied when the subscription is back: events may have been missed meanwhile).
        self._subscribed = False
        self.following.clear()
