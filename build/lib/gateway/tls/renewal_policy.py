"""When to renew a certificate and when to try again after a failure. Pure: numbers in, a time out.

Renewal is due with one third of the certificate's lifetime left (certmagic's and Let's Encrypt's
advice), unless the ACME server suggests a window (ARI, RFC 9773): then at the random moment inside it
that the ``acme`` library picks (``Renewer`` keeps it per certificate).
Failures back off from a minute, doubling, to a day; a server's ``Retry-After`` is a floor.
"""

from __future__ import annotations

import email.utils

FIRST_RETRY_S = 60.0
MAX_RETRY_S = 86400.0


def renew_at(not_before: float, not_after: float) -> float:
    """The moment renewal is due (epoch seconds) when the ACME server suggests no window."""
    return not_after - (not_after - not_before) / 3


def retry_delay(failures: int, *, retry_after_s: float | None = None) -> float:
    """Seconds to wait before attempt ``failures + 1`` (``failures`` >= 1)."""
    delay = min(FIRST_RETRY_S * 2 ** max(failures - 1, 0), MAX_RETRY_S)
    if retry_after_s is not None and retry_after_s > delay:
        return min(retry_after_s, MAX_RETRY_S * 7)  # a server asking for more than a week is capped
    return delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None  # RFC 9110 dates are GMT; one without a zone is not one
    return max(0.0, when.timestamp() - now)
