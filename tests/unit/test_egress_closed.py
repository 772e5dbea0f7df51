"""What is closed to VMs' egress beyond the policy: the gateway's state (the hosts a Redis URL names)
and the host's own addresses (the kernel says which)."""

from __future__ import annotations

from gateway.egress.proxy import is_host_address
from gateway.state.redis_url import url_hosts


def test_the_hosts_a_redis_url_names() -> None:
    assert url_hosts("redis://:pw@10.1.2.3:6379/0") == ["10.1.2.3"]
    assert url_hosts("redis+sentinel://s1:26379,s2/mymaster") == ["s1", "s2"]
    assert url_hosts("redis+cluster://n1:7000,[fd00::9]:7001") == ["n1", "fd00::9"]
    assert url_hosts("unix:///run/redis.sock") == []


def test_the_hosts_own_addresses_are_known_as_such() -> None:
    assert is_host_address("127.0.0.1") and is_host_address("::1")
    assert not is_host_address("192.0.2.200")  # TEST-NET-1: never this host's in a test run
    assert not is_host_address("2001:db8::1")
