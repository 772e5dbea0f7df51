"""A request rate per API key at the edge (``edge.api_rate_per_key``): a token bucket per key in each edge
process, so one runaway client slows down alone, before its requests reach the control plane.

Pure: the caller passes the clock. Keys are held by their hash, never as sent.
"""

from __future__ import annotations

import math
from typing import Final

# Past this many keys the buckets start over (each key then gets a full burst again): bounded memory.
MAX_KEYS: Final = 100_000


class KeyRates:
    """Token buckets: ``rate_per_s`` requests per second per key, up to ``burst`` at once."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = MAX_KEYS) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(max(1, burst))
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key hash -> (tokens, when counted)

    def retry_after(self, key_hash: str, now: float) -> int:
        """0 when a request with this key may go now (it takes a token); else the whole seconds until
        one would be there (for Retry-After)."""
        found = self._buckets.get(key_hash)
        if found is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.clear()
            tokens = self.burst
        else:
            tokens = min(self.burst, found[0] + (now - found[1]) * self.rate_per_s)
        if tokens >= 1.0:
            self._buckets[key_hash] = (tokens - 1.0, now)
            return 0
        self._buckets[key_hash] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate_per_s))
