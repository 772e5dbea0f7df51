"""The edge's request rate per API key: token buckets on a clock the test holds."""

from __future__ import annotations

import pytest

from gateway.edge.access import platform_key
from gateway.edge.ratelimit import KeyRates

pytestmark = pytest.mark.both_edges


def test_a_key_gets_its_burst_then_its_rate_and_the_wait_until_its_next_request() -> None:
    rates = KeyRates(rate_per_s=2.0, burst=3)
    assert [rates.retry_after("a", 0.0) for _ in range(3)] == [0, 0, 0]
    assert rates.retry_after("a", 0.0) == 1  # empty: half a second to the next token, said as 1 s
    assert rates.retry_after("b", 0.0) == 0  # another key has its own bucket
    assert rates.retry_after("a", 0.5) == 0  # refilled at 2/s
    assert rates.retry_after("a", 0.5) == 1
    assert [rates.retry_after("a", 100.0) for _ in range(4)] == [0, 0, 0, 1]  # never more than the burst


def test_a_slow_rate_says_how_many_seconds_to_wait() -> None:
    rates = KeyRates(rate_per_s=0.25, burst=1)
    assert rates.retry_after("k", 10.0) == 0
    assert rates.retry_after("k", 10.0) == 4
    assert rates.retry_after("k", 13.0) == 1  # (a refused request does not take a token)
    assert rates.retry_after("k", 14.0) == 0


def test_the_buckets_are_bounded() -> None:
    rates = KeyRates(rate_per_s=1.0, burst=1, max_keys=3)
    for key in "abc":
        assert rates.retry_after(key, 0.0) == 0
    assert rates.retry_after("a", 0.0) == 1
    assert rates.retry_after("d", 0.0) == 0  # a fourth key: the buckets start over
    assert rates.retry_after("a", 0.0) == 0


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ([(b"X-API-Key", b" gk_live_1 ")], b"gk_live_1"),
        ([(b"Accept", b"*/*"), (b"authorization", b"Bearer  gk_live_2")], b"gk_live_2"),
        ([(b"X-API-Key", b"the-apps-own")], None),  # not a platform key: the app's business
        ([(b"Authorization", b"Basic gk_live_3")], None),
        ([], None),
    ],
)
def test_the_platform_key_of_a_request(headers: list[tuple[bytes, bytes]], key: bytes | None) -> None:
    assert platform_key(headers) == key
