"""Per-key request rate limits: one token bucket per client key, in this process.

No rate-limit library is installed in this project (`limits`, `slowapi`, `aiolimiter` are
not in requirements.txt, and adding one is a lock-file change), and what is needed is small:
a bucket of `burst` requests refilled at `rpm / 60` per second. All calls come from the
event loop thread, so there is no lock.

Limits are per replica: with N replicas behind a load balancer a key gets up to N times its
rpm. A shared limit needs a shared counter (e.g. the `limits` library on Redis); the
`acquire` signature is the seam for that.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBuckets:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill)

    def acquire(self, key: str, rpm: int, burst: int | None = None) -> float | None:
        """Take one request from `key`'s bucket: None if allowed, else seconds until it would be."""
        if rpm <= 0:  # unlimited
            return None
        capacity = float(burst or rpm)
        rate = rpm / 60.0
        now = self._clock()
        tokens, last = self._buckets.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return None
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate
