from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.tls.renewal_policy import FIRST_RETRY_S, MAX_RETRY_S, parse_retry_after, renew_at, retry_delay

DAY = 86400.0


def test_renewal_is_due_with_a_third_of_the_lifetime_left() -> None:
    assert renew_at(0, 90 * DAY) == 60 * DAY
    assert renew_at(1000.0, 1000.0 + 6 * DAY) == 1000.0 + 4 * DAY  # short-lived certificates too


@given(st.floats(0, 1e9), st.floats(60, 1e8))
def test_renewal_always_falls_inside_the_validity(not_before: float, lifetime: float) -> None:
    at = renew_at(not_before, not_before + lifetime)
    assert not_before < at < not_before + lifetime


@pytest.mark.parametrize(
    ("failures", "retry_after", "expected"),
    [
        (1, None, FIRST_RETRY_S),
        (2, None, 2 * FIRST_RETRY_S),
        (5, None, 16 * FIRST_RETRY_S),
        (40, None, MAX_RETRY_S),  # never more than a day on our own
        (1, 3600.0, 3600.0),  # the server's Retry-After is a floor
        (5, 10.0, 16 * FIRST_RETRY_S),  # but never shortens our back-off
        (1, 1e9, 7 * MAX_RETRY_S),  # and an absurd one is capped at a week
    ],
)
def test_failures_back_off_and_respect_retry_after(
    failures: int, retry_after: float | None, expected: float
) -> None:
    assert retry_delay(failures, retry_after_s=retry_after) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("-5", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),  # now is a minute before it
        ("Wed, 21 Oct 2015 07:26:00 GMT", 0.0),  # already past: no wait
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(header: str | None, expected: float | None) -> None:
    now = datetime.datetime(2015, 10, 21, 7, 27, tzinfo=datetime.UTC).timestamp()
    assert parse_retry_after(header, now) == expected
