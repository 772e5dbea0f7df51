"""When to renew a certificate and when to try again after a failure. Pure: numbers in, a time out.

Renewal is due with one third of the certificate's lifetime left (certmagic's and Let's Encrypt's
advice), or, when the ACME server suggests a window (ARI, RFC 9773), at a point inside that window that
the caller picks once per certificate (``window_fraction``), so a fleet does not renew all at once.
Failures back off from a minute, doubling, to a day; a server's ``Retry-After`` is a floor.
"""

from __future__ import annotations

FIRST_RETRY_S = 60.0
MAX_RETRY_S = 86400.0


def renew_at(
    not_before: float,
    not_after: float,
    *,
    ari_window: tuple[float, float] | None = None,
    window_fraction: float = 0.5,
) -> float:
    """The moment renewal is due (epoch seconds)."""
    if ari_window is not None:
        start, end = ari_window
        if end > start:
            return start + (end - start) * min(max(window_fraction, 0.0), 1.0)
        return start
    return not_after - (not_after - not_before) / 3


def retry_delay(failures: int, *, retry_after_s: float | None = None) -> float:
    """Seconds to wait before attempt ``failures + 1`` (``failures`` >= 1)."""
    delay = min(FIRST_RETRY_S * 2 ** max(failures - 1, 0), MAX_RETRY_S)
    if retry_after_s is not None and retry_after_s > delay:
        return min(retry_after_s, MAX_RETRY_S * 7)  # a server asking for more than a week is capped
    return delay
