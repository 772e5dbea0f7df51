"""The Redis client: how it is made (one server, Sentinel or Cluster) and how every call is made.

Every Redis call goes through ``guarded``, so callers see ``StoreUnavailable`` rather than a redis-py
exception, and this process's call latency and failures are counted in one place (``REDIS_STATS``).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar, cast, overload

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from gateway.errors import StoreUnavailable
from gateway.state.redis_url import parse_cluster_url, parse_sentinel_url

T = TypeVar("T")

REDIS_MAX_CONNECTIONS = 64


class _SentinelMaster(aioredis.Redis):
    """The primary named by Sentinels; closing it closes the connections to the Sentinels as well."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", []):
            await sentinel.aclose()


def connect(url: str, timeout_s: float) -> aioredis.Redis:
    """A client with bounded calls; decode_responses because every value we store is text.

    ``redis://``, ``rediss://`` and ``unix://`` URLs name one server; ``redis+sentinel://`` names Sentinels
    that say which server is the primary (see ``gateway.state.redis_url``); the client asks them again after a
    failover. A blocking pool for one server: a burst of callers beyond its size waits (up to the call
    timeout) for a connection instead of failing at once, as redis-py's default pool does.
    """
    cluster = parse_cluster_url(url)
    if cluster is not None:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],
            username=cluster.username,
            password=cluster.password,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=REDIS_MAX_CONNECTIONS,
        )  # type: ignore[return-value]  # the commands the gateway uses are the same
    target = parse_sentinel_url(url)
    if target is not None:
        timeouts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        sentinel = Sentinel(
            target.sentinels,
            sentinel_kwargs={**timeouts, "password": target.sentinel_password},
            **timeouts,
        )
        return sentinel.master_for(
            target.service,
            redis_class=_SentinelMaster,
            db=target.db,
            username=target.username,
            password=target.password,
            decode_responses=True,
            max_connections=REDIS_MAX_CONNECTIONS,
            health_check_interval=30,
            **timeouts,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=timeout_s,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)


class RedisCallStats:
    """Latency and failures of this process's Redis calls (every one goes through ``guarded``), as plain
    numbers that ``gateway.metrics`` exports."""

    BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self) -> None:
        self.buckets = [0] * (len(self.BUCKETS_S) + 1)
        self.sum = 0.0
        self.count = 0
        self.errors = 0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(self.BUCKETS_S, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "sum": self.sum, "count": self.count, "errors": self.errors}


REDIS_STATS = RedisCallStats()


# redis-py types every reply as `bytes | str`: it cannot know that a client decodes. Every client of ours
# does (`connect`), and every call goes through `guarded`, so its overloads are where replies become text.
@overload
async def guarded(call: Awaitable[dict[bytes | str, bytes | str]]) -> dict[str, str]: ...
@overload
async def guarded(call: Awaitable[set[bytes | str]]) -> set[str]: ...
@overload
async def guarded(call: Awaitable[bytes | str | None]) -> str | None: ...
@overload
async def guarded(call: Awaitable[T]) -> T: ...
async def guarded(call: Awaitable[Any]) -> Any:
    """Await a Redis call, translating its failures to StoreUnavailable."""
    started = time.perf_counter()
    try:
        return await call
    except RedisError as exc:
        REDIS_STATS.errors += 1
        raise StoreUnavailable(f"state store unavailable: {type(exc).__name__}") from exc
    finally:
        REDIS_STATS.observe(time.perf_counter() - started)


def hash_fields(mapping: Mapping[str, EncodableT]) -> Mapping[FieldT, EncodableT]:
    """A text hash as ``hset(mapping=...)`` takes it (redis-py types its keys as an invariant union)."""
    return cast(Mapping[FieldT, EncodableT], mapping)


def text_list(reply: list[bytes | str] | list[tuple[bytes | str, Any]] | list[list[Any]]) -> list[str]:
    """A decoded client's answer to a range query without scores (see ``guarded``)."""
    return cast(list[str], reply)
