"""Sentinel URLs for GATEWAY_REDIS_URL (pure)."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, load_config
from gateway.state.redis_url import (
    ClusterTarget,
    RedisUrlError,
    SentinelTarget,
    has_hash_tag,
    parse_cluster_url,
    parse_sentinel_url,
)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        (
            "redis+sentinel://s1:26379,s2:26380/mymaster",
            SentinelTarget([("s1", 26379), ("s2", 26380)], "mymaster"),
        ),
        (
            "redis+sentinel://app:p%40ss@10.0.0.1,[::1]:5000/cache/3?sentinel_password=sp",
            SentinelTarget([("10.0.0.1", 26379), ("::1", 5000)], "cache", 3, "app", "p@ss", "sp"),
        ),
        ("sentinel://:pw@h/m", SentinelTarget([("h", 26379)], "m", 0, None, "pw")),
    ],
)
def test_sentinel_urls_name_sentinels_service_db_and_credentials(url: str, target: SentinelTarget) -> None:
    assert parse_sentinel_url(url) == target


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "unix:///run/redis.sock", "", "rediss://h"])
def test_other_urls_are_not_sentinel_urls(url: str) -> None:
    assert parse_sentinel_url(url) is None


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h:99999/m",
        "redis+sentinel://h:port/m",
        "redis+sentinel://h:26379",
        "redis+sentinel://h:26379/m/db",
        "redis+sentinel://h:26379/m/0/extra",
        "redis+sentinel://,/m",
    ],
)
def test_malformed_sentinel_urls_are_config_errors(url: str) -> None:
    with pytest.raises(RedisUrlError):
        parse_sentinel_url(url)
    with pytest.raises(ConfigError, match=r"redis\.url"):
        load_config(environ={"GATEWAY_REDIS_URL": url})


def test_cluster_urls_name_their_nodes() -> None:
    target = parse_cluster_url("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert target == ClusterTarget([("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)], None, "pw")
    assert parse_cluster_url("redis://h") is None
    with pytest.raises(RedisUrlError, match="database 0"):
        parse_cluster_url("redis+cluster://h:7000/1")


@pytest.mark.parametrize(
    ("prefix", "tagged"), [("{gw}:", True), ("app:{x}:", True), ("gw:", False), ("{}:", False)]
)
def test_a_cluster_needs_a_hash_tag_in_the_key_prefix(prefix: str, tagged: bool) -> None:
    assert has_hash_tag(prefix) is tagged
    environ = {"GATEWAY_REDIS_URL": "redis+cluster://127.0.0.1:7000", "GATEWAY_REDIS_KEY_PREFIX": prefix}
    if tagged:
        assert load_config(environ=environ).redis.key_prefix == prefix
    else:
        with pytest.raises(ConfigError, match="hash tag"):
            load_config(environ=environ)
