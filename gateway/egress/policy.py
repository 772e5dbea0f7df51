"""Whether a VM may open a connection: the egress policy's decision (pure: values in, a decision out).

The policy has the official SDK's shape (``allow_public_repos``, ``allow_http``, ``allow_https``,
``allowed_domains``, ``allowed_cidrs``). The operator adds two lists: the package registries that
``allow_public_repos`` opens, and networks no policy can open (link-local and metadata addresses,
loopback, the VM ranges, the gateway's own addresses). Private ranges are closed unless a policy names
them in ``allowed_cidrs``.

A connection is judged by the name it asks for (the TLS SNI, the HTTP Host, or the name the VM's DNS
lookup returned the address for) and the address it goes to. The name only opens an address that the
name resolved to for this VM (the proxy checks that before asking here): a name is never a way around
the address rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Protocol = Literal["http", "tls", "tcp"]

# Closed unless a policy's allowed_cidrs names them (RFC 1918, unique local, CGNAT).
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
# Never open: loopback, link-local (cloud metadata lives there), multicast, unspecified, reserved.
ALWAYS_CLOSED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
        "::/128", "::1/128", "fe80::/10", "ff00::/8",
    )
)  # fmt: skip
MAX_NAME_LENGTH = 253


@dataclass(frozen=True)
class EgressPolicy:
    """What one VM may reach; the SDK's fields."""

    allow_public_repos: bool = False
    allow_http: bool = False
    allow_https: bool = False
    allowed_domains: tuple[str, ...] = ()
    allowed_cidrs: tuple[str, ...] = ()

    @classmethod
    def from_fields(cls, stored: Mapping[str, Any]) -> EgressPolicy:
        """A stored policy (the SDK's fields, as kept in the state)."""
        return cls(
            allow_public_repos=bool(stored.get("allow_public_repos")),
            allow_http=bool(stored.get("allow_http")),
            allow_https=bool(stored.get("allow_https")),
            allowed_domains=tuple(str(d) for d in stored.get("allowed_domains") or ()),
            allowed_cidrs=tuple(str(c) for c in stored.get("allowed_cidrs") or ()),
        )

    def sdk_fields(self) -> dict[str, Any]:
        """The SDK's fields (what the API shows)."""
        shown = asdict(self)
        shown["allowed_domains"] = list(self.allowed_domains)
        shown["allowed_cidrs"] = list(self.allowed_cidrs)
        return shown


# A VM whose record (and session) names no policy: the package registries only (pip install works,
# nothing else does); what a user opens more of is theirs to say.
DEFAULT_POLICY = EgressPolicy(allow_public_repos=True, allow_http=True, allow_https=True)


def effective_policy(stored: Mapping[str, Any]) -> EgressPolicy:
    """The policy a stored one means: an empty one is the default."""
    return EgressPolicy.from_fields(stored) if stored else DEFAULT_POLICY


@dataclass(frozen=True)
class OperatorRules:
    """The operator's part (``[egress]`` in config): the registries, and networks closed to every VM."""

    public_repos: tuple[str, ...] = ()
    denied_networks: tuple[IpNetwork, ...] = ()
    # Whatever a policy says, these stay closed too (built in, listed here for the decision's reason).
    always_closed: tuple[IpNetwork, ...] = field(default=ALWAYS_CLOSED)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # why: the rule that decided, for the log, the metrics and the VM's denial list


def normalise_name(name: str) -> str:
    return name.strip().lower().removesuffix(".")


def valid_pattern(pattern: str) -> bool:
    """An allowed_domains entry: a DNS name, or ``*.`` and a DNS name (a suffix)."""
    name = normalise_name(pattern)
    if name.startswith("*."):
        name = name[2:]
    labels = name.split(".")
    return (
        0 < len(name) <= MAX_NAME_LENGTH
        and len(labels) >= 2
        and all(
            0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii() for label in labels
        )
        and not all(label.isdigit() for label in labels)
    )


def name_matches(name: str, pattern: str) -> bool:
    """``example.com`` matches itself only; ``*.example.com`` matches any name below it, not itself."""
    name, pattern = normalise_name(name), normalise_name(pattern)
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def _networks(cidrs: Iterable[str]) -> list[IpNetwork]:
    found = []
    for cidr in cidrs:
        try:
            found.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            continue  # (validated when the policy was set; an old record's junk opens nothing)
    return found


def _within(address: IpAddress, networks: Iterable[IpNetwork]) -> IpNetwork | None:
    for network in networks:
        if address.version == network.version and address in network:
            return network
    return None


def decide(
    policy: EgressPolicy, rules: OperatorRules, protocol: Protocol, address: str, port: int, name: str | None
) -> Decision:
    """May this VM open ``protocol`` to ``address``:``port``, asking for ``name`` (None: unknown)?"""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return Decision(False, "bad_address")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if not 0 < port < 65536:
        return Decision(False, "bad_port")
    closed = _within(ip, rules.always_closed) or _within(ip, rules.denied_networks)
    if closed is not None:
        return Decision(False, f"denied_network:{closed}")
    if protocol == "http" and not policy.allow_http:
        return Decision(False, "http_not_allowed")
    if protocol == "tls" and not policy.allow_https:
        return Decision(False, "https_not_allowed")
    allowed_networks = _networks(policy.allowed_cidrs)
    by_cidr = _within(ip, allowed_networks)
    private = _within(ip, PRIVATE_NETWORKS)
    if private is not None and by_cidr is None:
        return Decision(False, f"private_network:{private}")
    if name:
        if policy.allow_public_repos and any(name_matches(name, repo) for repo in rules.public_repos):
            return Decision(True, "public_repos")
        for pattern in policy.allowed_domains:
            if name_matches(name, pattern):
                return Decision(True, f"domain:{normalise_name(pattern)}")
    if by_cidr is not None:
        return Decision(True, f"cidr:{by_cidr}")
    return Decision(False, "not_allowed")


def name_allowed(policy: EgressPolicy, rules: OperatorRules, name: str) -> Decision:
    """May the VM's resolver answer ``name`` (others get NXDOMAIN)? By name only: the address is judged
    when a connection is made."""
    if not valid_pattern(name) or name.startswith("*"):
        return Decision(False, "bad_name")
    if policy.allow_public_repos and any(name_matches(name, repo) for repo in rules.public_repos):
        return Decision(True, "public_repos")
    for pattern in policy.allowed_domains:
        if name_matches(name, pattern):
            return Decision(True, f"domain:{normalise_name(pattern)}")
    return Decision(False, "not_allowed")
