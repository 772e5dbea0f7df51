"""Redis Sentinel and Cluster URLs (pure).

- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``
- ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (any nodes of the cluster; it tells the
  rest). The gateway's Lua scripts touch several keys, so in a cluster every key must be in one slot:
  ``redis.key_prefix`` needs a hash tag, e.g. ``{gw}:`` (the Cluster gives availability, not sharding).


redis-py connects to one server from a URL but to Sentinels only from a list, so this names the
Sentinels, the monitored service (the primary's name in ``sentinel monitor``) and the database in one
string for ``GATEWAY_REDIS_URL``. The password is the data servers'; Sentinels with a password of their
own take ``?sentinel_password=...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

SENTINEL_SCHEMES = ("redis+sentinel", "sentinel")
CLUSTER_SCHEMES = ("redis+cluster",)
DEFAULT_SENTINEL_PORT = 26379


class RedisUrlError(ValueError):
    pass


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


@dataclass(frozen=True)
class ClusterTarget:
    nodes: list[tuple[str, int]]
    username: str | None = None
    password: str | None = None


def parse_cluster_url(url: str) -> ClusterTarget | None:
    """The nodes of a ``redis+cluster://`` URL; None for any other URL."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in CLUSTER_SCHEMES:
        return None
    parts = urlsplit("//" + rest)
    if parts.path.strip("/"):
        raise RedisUrlError("a Redis Cluster has only database 0: no path in a redis+cluster:// URL")
    username, password, hosts = _credentials(parts.netloc)
    return ClusterTarget([_address(item.strip(), 6379) for item in hosts.split(",")], username, password)


def _credentials(netloc: str) -> tuple[str | None, str | None, str]:
    credentials, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    return username, password, hosts


def has_hash_tag(prefix: str) -> bool:
    """Whether keys with this prefix all hash to one Cluster slot (a non-empty {tag} in it)."""
    start = prefix.find("{")
    return start >= 0 and prefix.find("}", start + 2) > start + 1


def _address(item: str, default_port: int = DEFAULT_SENTINEL_PORT) -> tuple[str, int]:
    """host, host:port, [v6] or [v6]:port."""
    if item.startswith("["):
        host, _, after = item[1:].partition("]")
        port = after.removeprefix(":") if after else str(default_port)
    else:
        host, colon, port = item.rpartition(":")
        if not colon:
            host, port = item, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RedisUrlError(f"bad address {item!r} in the Redis URL")
    return host, int(port)


def parse_sentinel_url(url: str) -> SentinelTarget | None:
    """The Sentinel target of a ``redis+sentinel://`` URL; None for any other URL."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SENTINEL_SCHEMES:
        return None
    parts = urlsplit("//" + rest)
    username, password, hosts = _credentials(parts.netloc)
    sentinels = [_address(item.strip()) for item in hosts.split(",")]
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2:
        raise RedisUrlError("a Sentinel URL ends with /<service name>[/<db>]")
    if len(path) == 2 and not path[1].isdigit():
        raise RedisUrlError(f"bad database number {path[1]!r} in the Redis URL")
    query = parse_qs(parts.query)
    return SentinelTarget(
        sentinels=sentinels,
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
        sentinel_password=query.get("sentinel_password", [None])[0],
    )


def url_hosts(url: str) -> list[str]:
    """The hosts a Redis URL names (a plain URL's host, the sentinels, the cluster's nodes); none for a
    unix socket. Closed to VMs' egress: a VM must never reach the gateway's state."""
    sentinel = parse_sentinel_url(url)
    if sentinel is not None:
        return [host for host, _ in sentinel.sentinels]
    cluster = parse_cluster_url(url)
    if cluster is not None:
        return [host for host, _ in cluster.nodes]
    host = urlsplit(url).hostname
    return [host] if host else []
