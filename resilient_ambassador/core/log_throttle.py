"""At most one log line per kind of event per interval, so an upstream outage at 5,000 req/s
logs a line a second with a count, not 5,000 lines."""

from __future__ import annotations

from collections.abc import Hashable
from typing import final


@final
class LogThrottle:
    __slots__ = ("_interval_s", "_state")

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval_s = interval_s
        self._state: dict[Hashable, tuple[float, int]] = {}  # key -> (next allowed, suppressed)

    def allow(self, key: Hashable, now: float) -> int | None:
        """None: stay quiet. Otherwise log now; the int is how many were suppressed before."""
        next_allowed, suppressed = self._state.get(key, (now, 0))
        if now < next_allowed:
            self._state[key] = (next_allowed, suppressed + 1)
            return None
        self._state[key] = (now + self._interval_s, 0)
        return suppressed
