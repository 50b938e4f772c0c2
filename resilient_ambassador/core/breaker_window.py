"""The circuit breaker's volume guard: has an upstream seen enough requests lately for its
failure streak to mean anything?

The question is only ever "at least `min_requests` in the last `window_s`?", so the guard
keeps the timestamps of the last `min_requests` requests and nothing else: the answer is exact
(no bucket rounding) and the memory is bounded by `min_requests`, whatever the request rate.
"""

from __future__ import annotations

from collections import deque
from typing import final


@final
class VolumeWindow:
    """Sliding-window request counter, saturating at `min_requests`. Times are seconds on any
    monotonic clock; a request at `t` is inside the window at `now` while `now - t < window_s`."""

    __slots__ = ("_recent", "min_requests", "window_s")

    def __init__(self, min_requests: int, window_s: float) -> None:
        if min_requests < 0:
            raise ValueError(f"min_requests must be >= 0, got {min_requests}")
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.min_requests = min_requests
        self.window_s = window_s
        self._recent: deque[float] = deque(maxlen=min_requests)

    def record(self, now: float) -> None:
        """Note one request at `now` (the oldest kept timestamp falls off)."""
        self._recent.append(now)

    def count(self, now: float) -> int:
        """Requests inside the window at `now`, but never more than `min_requests`: beyond that
        the guard has no need to know."""
        return sum(1 for t in self._recent if now - t < self.window_s)

    def satisfied(self, now: float) -> bool:
        """True when at least `min_requests` requests fall inside the window at `now`."""
        if self.min_requests == 0:
            return True
        # Timestamps are appended in time order, so the oldest kept one decides.
        return len(self._recent) == self.min_requests and now - self._recent[0] < self.window_s
