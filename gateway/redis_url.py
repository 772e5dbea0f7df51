"""Redis Sentinel URLs (pure): ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``.

redis-py connects to one server from a URL but to Sentinels only from a list, so this names the
Sentinels, the monitored service (the primary's name in ``sentinel monitor``) and the database in one
string for ``GATEWAY_REDIS_URL``. The password is the data servers'; Sentinels with a password of their
own take ``?sentinel_password=...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

SENTINEL_SCHEMES = ("redis+sentinel", "sentinel")
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


def _address(item: str) -> tuple[str, int]:
    """host, host:port, [v6] or [v6]:port."""
    if item.startswith("["):
        host, _, after = item[1:].partition("]")
        port = after.removeprefix(":") if after else str(DEFAULT_SENTINEL_PORT)
    else:
        host, colon, port = item.rpartition(":")
        if not colon:
            host, port = item, str(DEFAULT_SENTINEL_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RedisUrlError(f"bad Sentinel address {item!r} in the Redis URL")
    return host, int(port)


def parse_sentinel_url(url: str) -> SentinelTarget | None:
    """The Sentinel target of a ``redis+sentinel://`` URL; None for any other URL."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SENTINEL_SCHEMES:
        return None
    parts = urlsplit("//" + rest)
    credentials, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
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
