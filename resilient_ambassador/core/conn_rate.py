"""A token bucket for new connections on a tcp listener (`relay.connection_rate`).

Pure: the caller passes `now`. Kept apart from the request rate limiter on purpose; the two
may be unified once both exist.
"""

from __future__ import annotations

from typing import final


@final
class ConnectionRate:
    """`count` connections per `per_s` seconds, with bursts of up to `count` (the bucket
    starts full, so a restart does not refuse the first wave of reconnects)."""

    __slots__ = ("_capacity", "_last", "_per_token_s", "_tokens")

    def __init__(self, count: float, per_s: float) -> None:
        if count <= 0 or per_s <= 0:
            raise ValueError("a rate needs a count and a period greater than 0")
        self._capacity = max(1.0, count)
        self._per_token_s = per_s / count
        self._tokens = self._capacity
        self._last: float | None = None

    def try_take(self, now: float) -> bool:
        """Take one token if there is one; False means refuse this connection."""
        if self._last is not None and now > self._last:
            self._tokens = min(self._capacity, self._tokens + (now - self._last) / self._per_token_s)
        if self._last is None or now > self._last:
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
