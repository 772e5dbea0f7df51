"""Where a request goes, decided from the request line and Host alone, before any lookup.

Pure: bytes in, a decision out. Every identifier is validated as text, before any percent-decoding, so
that the id the gateway routes by is exactly the id that was written in the URL. The rest of the target
is passed to the VM byte for byte (never decoded or normalised); dot segments are refused instead of
being resolved, because the gateway and the app could resolve them differently.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Final, Literal, final

from gateway.errors import edge_error

MAX_TARGET_BYTES: Final = 8192
# Header routing on the API host (``header_form``); the edge takes them out before the app sees the request.
SANDBOX_ID_HEADER: Final = b"x-sandbox-id"
SANDBOX_PORT_HEADER: Final = b"x-sandbox-port"
APP_PATH_PREFIX: Final = b"/v1/app/"
INSTANCE_LABEL_PREFIX: Final = b"instance-"

_SESSION_ID_RE: Final = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_VM_ID_RE: Final = re.compile(rb"vmid-[0-9a-f]{16,64}")
# No sign, no leading zero, ASCII digits only (a bytes pattern never matches other scripts' digits).
_PORT_RE: Final = re.compile(rb"[1-9][0-9]{0,4}")
# Anything outside visible ASCII: controls, space, DEL, non-ASCII.
_BAD_TARGET_BYTE_RE: Final = re.compile(rb"[^\x21-\x7e]")
_BAD_PERCENT_RE: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# A path segment that is ".", "..", or either spelled with %2e: these would be resolved differently
# by different parsers, so they are refused rather than normalised.
_DOT_SEGMENT_RE: Final = re.compile(rb"(?:^|/)(?:\.|%2[eE]){1,2}(?=/|\Z)")
_LABEL_RE: Final = re.compile(rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOST_PORT_RE: Final = re.compile(rb"[0-9]{1,5}")
_IPV6_BODY_RE: Final = re.compile(rb"[0-9a-f:.]+")
MAX_HOST_NAME_BYTES: Final = 253


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Which hosts serve what. Names are matched lower-case, without port or trailing dot."""

    api_hosts: tuple[str, ...]  # empty: every host that is not a sandbox host is the API host
    sandbox_domains: tuple[str, ...]
    max_target_bytes: int = MAX_TARGET_BYTES
    # Base domains of browser instances: instance-<uuid>.<domain>.
    instance_domains: tuple[str, ...] = ()
    # Normalised byte forms, computed once so parse_target does no per-request encoding of config.
    _api: frozenset[bytes] = field(init=False, repr=False, compare=False)
    _suffixes: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    _instance_suffixes: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        api = frozenset(_norm_name(h) for h in self.api_hosts if h)
        # Longest first, so that of nested domains the most specific one decides.
        suffixes = tuple(
            sorted({b"." + _norm_name(d) for d in self.sandbox_domains if d}, key=len, reverse=True)
        )
        instance_suffixes = tuple(b"." + _norm_name(d) for d in self.instance_domains if d)
        object.__setattr__(self, "_api", api)
        object.__setattr__(self, "_suffixes", suffixes)
        object.__setattr__(self, "_instance_suffixes", instance_suffixes)


@final  # so that `type(target) is AppTarget` narrows (the edge tests the exact type, fast)
@dataclass(frozen=True, slots=True)
class AppTarget:
    kind: Literal["path", "host", "domain", "instance", "header"]
    session_id: str | None  # path form
    vm_id: str | None  # host form: "vmid-<hex>"
    port: int  # 0 for a custom domain or an instance: its record says which port it serves
    upstream_target: bytes  # the request-target sent to the VM; at least b"/"
    prefix: bytes | None  # path form: b"/v1/app/<session_id>/<port>", for X-Forwarded-Prefix
    host: bytes  # the validated Host header value, lower-cased, for X-Forwarded-Host
    host_name: bytes  # that value without port or trailing dot (an IPv6 literal keeps its brackets)
    # The route cache's key (route_key): by session id and port ("s"), VM id and port ("v"), instance id
    # ("i") or host name ("d"); and that id or name (for the access log).
    key: str
    route_id: str
    instance_id: str | None = None  # instance form: instance-<uuid>.<instance domain>


def route_key(kind: str, ident: str, port: int) -> str:
    """The route cache's key: a string, made once per parsed target (its hash is kept, where a tuple's
    is computed on every lookup). The id goes last, so ``key_parts`` gives any id back whole."""
    return f"{kind} {port} {ident}"


def key_parts(key: str) -> tuple[str, str, int]:
    """(kind, id, port) of a ``route_key``."""
    kind, port, ident = key.split(" ", 2)
    return kind, ident, int(port)


@final  # so that `type(target) is ApiTarget` narrows (the edge tests the exact type, fast)
@dataclass(frozen=True, slots=True)
class ApiTarget:
    host: bytes
    host_name: bytes


@final  # so that `type(target) is Rejection` narrows (the edge tests the exact type, fast)
@dataclass(frozen=True, slots=True)
class Rejection:
    status: int
    code: str
    message: str
    location: bytes | None = None  # for redirects


def _rejection(code: str, message: str | None = None) -> Rejection:
    status, default_message = edge_error(code)
    return Rejection(status, code, message or default_message)


_METHOD_NOT_ALLOWED: Final = _rejection("method_not_allowed")
_URI_TOO_LONG: Final = _rejection("uri_too_long")
_BAD_HOST: Final = _rejection("bad_host")
_NO_ROUTE: Final = _rejection("no_route", "no app is served at this host")


def _invalid(message: str) -> Rejection:
    return _rejection("invalid_target", message)


def parse_target(
    method: bytes, target: bytes, host: bytes | None, config: RoutingConfig
) -> AppTarget | ApiTarget | Rejection:
    """Classify one request. Never raises: any input yields one of the three results."""
    if method == b"CONNECT":
        return _METHOD_NOT_ALLOWED
    if len(target) > config.max_target_bytes:
        return _URI_TOO_LONG
    rejection = _check_target(target)
    if rejection is not None:
        return rejection
    split = _split_host(host)
    if split is None:
        return _BAD_HOST
    host_value, name = split

    if name not in config._api:
        for suffix in config._instance_suffixes:
            if name == suffix[1:]:
                return _NO_ROUTE
            if name.endswith(suffix):
                return _instance_form(target, host_value, name, name[: -len(suffix)])
        for suffix in config._suffixes:
            if name == suffix[1:]:
                return _NO_ROUTE  # the bare sandbox domain names no VM
            if name.endswith(suffix):
                return _host_form(target, host_value, name, name[: -len(suffix)])
        if config._api:
            # Any other name may be a customer's own domain: only the route store can tell.
            return _domain_form(target, host_value, name)
    if target.startswith(APP_PATH_PREFIX):
        return _path_form(target, host_value, name)
    return ApiTarget(host=host_value, host_name=name)


def _check_target(target: bytes) -> Rejection | None:
    """Checks that hold for every target, app or API."""
    if not target.startswith(b"/"):
        # Absolute form (a proxy request), authority form, and "*" (even with OPTIONS: the gateway
        # has nothing to say about itself that the API does not) are all refused.
        return _invalid("the request target must be an absolute path")
    if _BAD_TARGET_BYTE_RE.search(target):
        return _invalid("the request target contains a control, space or non-ASCII byte")
    if target.find(b"#") >= 0:
        return _invalid("the request target must not contain a fragment")
    if _BAD_PERCENT_RE.search(target):
        return _invalid("malformed percent-encoding in the request target")
    if target.partition(b"?")[0].find(b"\\") >= 0:
        # Some stacks treat "\" as "/", which would let the path mean different things to us and the VM.
        return _invalid("backslash in the request path")
    return None


def _split_host(raw: bytes | None) -> tuple[bytes, bytes] | None:
    """(Host value lower-cased, host name without port or trailing dot), or None when malformed."""
    if raw is None:
        return None
    value = raw.strip(b" \t").lower()  # leading/trailing OWS is not part of a field value
    if not value:
        return None
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0 or not _valid_ipv6(value[1:end]):
            return None
        name, after = value[: end + 1], value[end + 1 :]
        if after and not (after.startswith(b":") and _valid_host_port(after[1:])):
            return None
        return value, name
    name, colon, port = value.partition(b":")
    if colon and not _valid_host_port(port):
        return None  # also catches a second colon: it lands in the port text
    if name.endswith(b"."):
        name = name[:-1]
    if not name or len(name) > MAX_HOST_NAME_BYTES:
        return None
    # IPv4 dotted quads match the label grammar too, so one check covers both.
    if not all(_LABEL_RE.fullmatch(label) for label in name.split(b".")):
        return None
    return value, name


def _valid_ipv6(text: bytes) -> bool:
    if not _IPV6_BODY_RE.fullmatch(text):
        return False  # also refuses zone ids ("%"), which ipaddress would accept
    try:
        ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        return False
    return True


def _valid_host_port(text: bytes) -> bool:
    return _HOST_PORT_RE.fullmatch(text) is not None and 1 <= int(text) <= 65535


def _app_port(text: bytes) -> int | None:
    if _PORT_RE.fullmatch(text) is None:
        return None
    port = int(text)
    return port if port <= 65535 else None


def _host_form(target: bytes, host_value: bytes, name: bytes, label: bytes) -> AppTarget | Rejection:
    # A well-formed host under a sandbox domain that names no VM is "not found", not a bad request.
    if label.find(b".") >= 0:
        return _NO_ROUTE
    vm_id, dash, port_text = label.rpartition(b"-")
    port = _app_port(port_text) if dash else None
    if port is None or _VM_ID_RE.fullmatch(vm_id) is None:
        return _NO_ROUTE
    if _DOT_SEGMENT_RE.search(target.partition(b"?")[0]):
        return _invalid("dot segments are not allowed in app paths")
    vm = vm_id.decode("ascii")
    return AppTarget(
        kind="host",
        session_id=None,
        vm_id=vm,
        port=port,
        upstream_target=target,
        prefix=None,
        host=host_value,
        host_name=name,
        key=route_key("v", vm, port),
        route_id=vm,
    )


def _instance_form(target: bytes, host_value: bytes, name: bytes, label: bytes) -> AppTarget | Rejection:
    if not label.startswith(INSTANCE_LABEL_PREFIX):
        return _NO_ROUTE
    instance_id = label[len(INSTANCE_LABEL_PREFIX) :]
    if _SESSION_ID_RE.fullmatch(instance_id) is None:
        return _NO_ROUTE
    return _named_host("instance", target, host_value, name, instance_id.decode("ascii"))


def _domain_form(target: bytes, host_value: bytes, name: bytes) -> AppTarget | Rejection:
    if name.find(b".") < 0 or name.rpartition(b".")[2].isdigit() or name.startswith(b"["):
        return _NO_ROUTE  # a single label or an IP address is never a custom domain
    return _named_host("domain", target, host_value, name)


def _named_host(
    kind: Literal["domain", "instance"],
    target: bytes,
    host_value: bytes,
    name: bytes,
    instance_id: str | None = None,
) -> AppTarget | Rejection:
    """A host whose record says which VM and port (a custom domain, an instance): the whole target goes."""
    if _DOT_SEGMENT_RE.search(target.partition(b"?")[0]):
        return _invalid("dot segments are not allowed in app paths")
    domain = name.decode("ascii")
    return AppTarget(
        kind=kind,
        session_id=None,
        vm_id=None,
        port=0,
        upstream_target=target,
        prefix=None,
        host=host_value,
        host_name=name,
        instance_id=instance_id,
        key=route_key("i", instance_id, 0) if instance_id is not None else route_key("d", domain, 0),
        route_id=instance_id if instance_id is not None else domain,
    )


def _path_form(target: bytes, host_value: bytes, name: bytes) -> AppTarget | Rejection:
    path, question, query = target.partition(b"?")
    after = path[len(APP_PATH_PREFIX) :]
    session, slash, after = after.partition(b"/")
    if not _SESSION_ID_RE.fullmatch(session):
        return _invalid("the session id must be a lower-case UUID")
    if not slash:
        return _invalid("the app URL needs a port: /v1/app/<session_id>/<port>/")
    port_text, slash, rest = after.partition(b"/")
    port = _app_port(port_text)
    if port is None:
        return _invalid("the port must be a number from 1 to 65535 without leading zeros")
    prefix = APP_PATH_PREFIX + session + b"/" + port_text
    if not slash:
        # Relative links in the app resolve against the directory, so the bare prefix is redirected.
        return Rejection(308, "redirect", "the app URL ends with a slash", prefix + b"/" + question + query)
    if _DOT_SEGMENT_RE.search(path):
        return _invalid("dot segments are not allowed in app paths")
    session_id = session.decode("ascii")
    return AppTarget(
        kind="path",
        session_id=session_id,
        vm_id=None,
        port=port,
        upstream_target=b"/" + rest + question + query,
        prefix=prefix,
        host=host_value,
        host_name=name,
        key=route_key("s", session_id, port),
        route_id=session_id,
    )


def header_form(target: bytes, api: ApiTarget, routing: list[tuple[bytes, bytes]]) -> AppTarget | Rejection:
    """Header routing on the API host: ``X-Sandbox-Id`` (a session id or a VM id) and ``X-Sandbox-Port``
    name the app, so a client can keep one connection to the API host for many VMs. The same grammar as
    the path and host forms; the whole target goes to the app, as in the host form. ``routing``: the
    request's X-Sandbox-* headers as (lower-case name, value)."""
    ids = [value for name, value in routing if name == SANDBOX_ID_HEADER]
    ports = [value for name, value in routing if name == SANDBOX_PORT_HEADER]
    if len(ids) != 1 or len(ports) != 1:
        return _invalid("header routing takes one X-Sandbox-Id and one X-Sandbox-Port")
    sandbox_id, port_text = ids[0].strip(b" \t"), ports[0].strip(b" \t")
    port = _app_port(port_text)
    if port is None:
        return _invalid("X-Sandbox-Port must be a number from 1 to 65535 without leading zeros")
    if _DOT_SEGMENT_RE.search(target.partition(b"?")[0]):
        return _invalid("dot segments are not allowed in app paths")
    route_id = sandbox_id.decode("ascii", "replace")
    if _SESSION_ID_RE.fullmatch(sandbox_id):
        session_id, vm_id = route_id, None
        key = route_key("s", route_id, port)
    elif _VM_ID_RE.fullmatch(sandbox_id):
        session_id, vm_id = None, route_id
        key = route_key("v", route_id, port)
    else:
        return _invalid("X-Sandbox-Id must be a session id (a lower-case UUID) or a VM id (vmid-<hex>)")
    return AppTarget(
        kind="header",
        session_id=session_id,
        vm_id=vm_id,
        port=port,
        upstream_target=target,
        prefix=None,
        host=api.host,
        host_name=api.host_name,
        key=key,
        route_id=route_id,
    )


def _norm_name(name: str) -> bytes:
    return name.strip().lower().rstrip(".").encode("ascii", "replace")


class TargetParser:
    """``parse_target`` for one routing config, remembering recent answers.

    The answer depends only on the exact target and Host bytes (and on CONNECT, which is never
    remembered), so a remembered answer is the one a fresh parse would give. Browsers and API clients
    repeat the same few targets on a connection; the memo turns a dozen regular-expression checks into
    one dict lookup. Bounded: long targets are not remembered, and the memo is emptied when full.
    """

    MAX_ENTRIES = 4096
    MAX_REMEMBERED_TARGET_BYTES = 512

    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self._memo: dict[tuple[bytes, bytes | None], AppTarget | ApiTarget | Rejection] = {}

    def __call__(self, method: bytes, target: bytes, host: bytes | None) -> AppTarget | ApiTarget | Rejection:
        if method == b"CONNECT" or len(target) > self.MAX_REMEMBERED_TARGET_BYTES:
            return parse_target(method, target, host, self.config)
        key = (target, host)
        result = self._memo.get(key)
        if result is None:
            result = parse_target(method, target, host, self.config)
            if len(self._memo) >= self.MAX_ENTRIES:
                self._memo.clear()
            self._memo[key] = result
        return result
