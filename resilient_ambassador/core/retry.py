"""Retry maths and rules: which outcomes may be retried, full-jitter backoff, `Retry-After`,
the per-request retry state and the per-route retry budget.

Pure, like the rest of `core`: the caller passes `now` and the random draw, so every decision
is a plain function of its arguments and is tested without a clock (urllib3's `util/retry.py`
computes the delay; our `stages.retry` awaits `trio.sleep`).
"""

from __future__ import annotations

import calendar
import math
import re
import time
from dataclasses import dataclass
from typing import final

from resilient_ambassador.core.config import RetryConfig
from resilient_ambassador.core.errors import DeadlineExceeded, UpstreamError, UpstreamPoolTimeout

# With no deadline, an upstream `Retry-After` up to this long is waited out; a longer one is
# passed to the client at once. Envoy's rate-limited back-off caps at `max_interval` (300 s by
# default); we hold a client's request for far less, because nothing else bounds the wait.
RETRY_AFTER_CAP_S = 10.0

# RFC 6585 4 (429) and RFC 9110 15.6.4 (503) are the statuses whose Retry-After says "try later".
RETRY_AFTER_STATUSES = frozenset({429, 503})


def error_retry_reason(error: BaseException) -> str | None:
    """Why `error` may be retried (its reason), or None when it must not be.

    Only upstream failures are retried: connect/DNS/TLS failures, per-try timeouts, resets or
    garbage before a response, stale pooled connections. Everything the daemon decides itself
    is final: an open breaker, a local 429, a client error. Two upstream errors are final too:
    pool exhaustion (`UpstreamPoolTimeout`: the upstream was never contacted, and retrying only
    queues more waiters on a pool that is already full after waiting its acquire timeout), and
    `DeadlineExceeded` (there is no time left to retry in).
    """
    if not isinstance(error, UpstreamError):
        return None
    if isinstance(error, UpstreamPoolTimeout | DeadlineExceeded):
        return None
    return error.reason


def status_retry_reason(status: int, on_statuses: frozenset[int], retry_after_s: float | None) -> str | None:
    """Why a response status may be retried, or None. `retry_after_s` is the parsed upstream
    Retry-After (None when absent, invalid or not respected): it makes a 429 or 503 retryable
    even when the status is not in `on_statuses`."""
    if status in on_statuses:
        return f"status_{status}"
    if retry_after_s is not None and status in RETRY_AFTER_STATUSES:
        return f"status_{status}_retry_after"
    return None


def backoff_s(attempt: int, base_s: float, max_s: float, draw: float) -> float:
    """Full-jitter exponential backoff (AWS architecture blog, "Exponential Backoff And
    Jitter"): uniform in [0, min(max_s, base_s * 2**attempt)). Full jitter spreads a crowd of
    retries over the whole interval, so they do not arrive at the upstream in waves.

    `attempt` counts from 0 (the wait before the first retry); `draw` is uniform in [0, 1).
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if not 0.0 <= draw < 1.0:
        raise ValueError("draw must be in [0, 1)")
    # 2**attempt as a float overflows near 1024; far earlier than that the cap has won.
    ceiling = max_s if attempt >= 64 else min(max_s, base_s * 2.0**attempt)
    return draw * ceiling


_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MONTH = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"(\d\d):(\d\d):(\d\d)"
_MONTHS = {name: n for n, name in enumerate(_MONTH[1:-1].split("|"), start=1)}
# RFC 9110 5.6.7: IMF-fixdate is what senders use; recipients must also accept the two
# obsolete forms. HTTP-date is case-sensitive and always GMT.
_IMF_FIXDATE = re.compile(_DAY + r", (\d\d) " + _MONTH + r" (\d{4}) " + _TIME + r" GMT")
_RFC850_DATE = re.compile(
    r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), (\d\d)-"
    + _MONTH
    + r"-(\d\d) "
    + _TIME
    + r" GMT"
)
_ASCTIME_DATE = re.compile(_DAY + r" " + _MONTH + r" ([ \d]\d) " + _TIME + r" (\d{4})")
_DELAY_SECONDS = re.compile(r"\d+")


def parse_http_date(text: str, now_epoch_s: float) -> float | None:
    """Epoch seconds of an HTTP-date in any of the three RFC 9110 5.6.7 forms, or None.
    `now_epoch_s` resolves rfc850's two-digit year."""
    if m := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hh, mm, ss = m.groups()
    elif m := _ASCTIME_DATE.fullmatch(text):
        month, day, hh, mm, ss, year = m.groups()
    elif m := _RFC850_DATE.fullmatch(text):
        day, month, yy, hh, mm, ss = m.groups()
        # RFC 9110 5.6.7: a two-digit year more than 50 years ahead is in the past century.
        this_year = time.gmtime(now_epoch_s).tm_year
        full = this_year // 100 * 100 + int(yy)
        year = str(full - 100 if full > this_year + 50 else full)
    else:
        return None
    fields = (int(year), _MONTHS[month], int(day), int(hh), int(mm), int(ss))
    y, mo, d, h, mi, s = fields
    if not (1 <= d <= calendar.monthrange(y, mo)[1] and h <= 23 and mi <= 59 and s <= 60):
        return None
    # Second 60 is a leap second (RFC 9110 allows it); read it as the end of that minute.
    return float(calendar.timegm((y, mo, d, h, mi, min(s, 59), 0, 0, 0)))


def parse_retry_after(value: bytes, now_epoch_s: float) -> float | None:
    """Seconds to wait from a `Retry-After` value (RFC 9110 10.2.3: delay-seconds or an
    HTTP-date), or None when it is neither. A date in the past means 0. `-5` or `1.5` are not
    delay-seconds (`1*DIGIT`), so they are invalid, not negative."""
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        return float(text)  # absurdly long digit strings become inf: longer than any deadline
    at = parse_http_date(text, now_epoch_s)
    if at is None:
        return None
    return max(0.0, at - now_epoch_s)


@final
@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a retryable failure: wait `delay_s` and retry, or give up (`why`)."""

    retry: bool
    delay_s: float = 0.0
    why: str = ""


@final
@dataclass(frozen=True, slots=True)
class RetryState:
    """Where one request's retries stand. Immutable, as urllib3's `Retry`: `increment()`
    returns the next state, so a decision can never half-update it."""

    max_retries: int
    deadline: float = math.inf  # absolute, on the caller's clock; inf: no overall deadline
    retries: int = 0
    history: tuple[str, ...] = ()  # why each earlier attempt failed, oldest first

    @property
    def attempt(self) -> int:
        """The number of the attempt in flight or just finished, counting from 1."""
        return self.retries + 1

    def decide(
        self,
        *,
        now: float,
        draw: float,
        base_s: float,
        max_s: float,
        retry_after_s: float | None = None,
        retry_after_cap_s: float = RETRY_AFTER_CAP_S,
    ) -> RetryDecision:
        """Whether the failed attempt may be retried, and after how long. The budget is not
        consulted here: it is shared state, so the caller asks it last, right before retrying.

        An upstream Retry-After replaces the backoff. One longer than the time left (or, with no
        deadline, than `retry_after_cap_s`) means give up now and pass the upstream's answer
        through. No wait may end at or past the deadline: the retry would have no time left.
        """
        if self.retries >= self.max_retries:
            return RetryDecision(False, why="retries_exhausted")
        if retry_after_s is not None:
            limit_s = self.deadline - now if math.isfinite(self.deadline) else retry_after_cap_s
            if retry_after_s > limit_s:
                return RetryDecision(False, why="retry_after_too_long")
            delay_s = retry_after_s
        else:
            delay_s = backoff_s(self.retries, base_s, max_s, draw)
        if now + delay_s >= self.deadline:
            return RetryDecision(False, why="deadline")
        return RetryDecision(True, delay_s=delay_s)

    def increment(self, reason: str) -> RetryState:
        """The state for the next attempt, after one that failed for `reason`."""
        return RetryState(self.max_retries, self.deadline, self.retries + 1, (*self.history, reason))


@final
class RetryBudget:
    """Caps retries at `ratio` of the requests seen in a sliding window, with a floor of
    `min_per_s` retries per second of window (Linkerd's retry budget; Envoy's `retry_budget`
    is the same idea over active requests). When an upstream fails, retries stop adding load
    after a 20% (by default) surplus instead of multiplying it by the attempt count.

    Counts live in `slices` ring buckets (1 s each for the default 10 s window), so memory is
    fixed and each call costs O(1) amortised. The window is the current partial slice plus the
    `slices - 1` before it: between (slices-1)/slices of `window_s` and `window_s`.
    """

    __slots__ = (
        "_floor",
        "_newest",
        "_ratio",
        "_requests",
        "_retries",
        "_slice_s",
        "_total_requests",
        "_total_retries",
    )

    def __init__(self, *, ratio: float, min_per_s: float, window_s: float, slices: int = 10) -> None:
        if not (ratio >= 0 and min_per_s >= 0 and window_s > 0 and slices >= 1):
            raise ValueError("need ratio >= 0, min_per_s >= 0, window_s > 0, slices >= 1")
        self._ratio = ratio
        self._floor = min_per_s * window_s
        self._slice_s = window_s / slices
        self._requests = [0] * slices
        self._retries = [0] * slices
        self._total_requests = 0
        self._total_retries = 0
        self._newest: int | None = None  # absolute index of the newest slice

    @classmethod
    def from_config(cls, config: RetryConfig) -> RetryBudget:
        return cls(
            ratio=config.budget_ratio, min_per_s=config.budget_min_per_s, window_s=config.budget_window_s
        )

    def record_request(self, now: float) -> None:
        """Count one request (every request, retried or not)."""
        self._requests[self._advance(now)] += 1
        self._total_requests += 1

    def record_retry(self, now: float) -> None:
        """Count one retry actually sent."""
        self._retries[self._advance(now)] += 1
        self._total_retries += 1

    def can_retry(self, now: float) -> bool:
        """True while the retries in the window stay below the budget."""
        self._advance(now)
        return self._total_retries < max(self._floor, self._ratio * self._total_requests)

    def requests(self, now: float) -> int:
        self._advance(now)
        return self._total_requests

    def retries(self, now: float) -> int:
        self._advance(now)
        return self._total_retries

    def _advance(self, now: float) -> int:
        """Expire the slices that left the window; the ring position of `now`'s slice."""
        n = len(self._requests)
        index = math.floor(now / self._slice_s)
        newest = self._newest
        if newest is None or index - newest >= n:
            self._requests[:] = [0] * n
            self._retries[:] = [0] * n
            self._total_requests = self._total_retries = 0
        elif index > newest:
            for i in range(newest + 1, index + 1):
                slot = i % n
                self._total_requests -= self._requests[slot]
                self._total_retries -= self._retries[slot]
                self._requests[slot] = self._retries[slot] = 0
        else:
            # Same slice, or a clock that stepped back: count it in the newest slice.
            return newest % n
        self._newest = index
        return index % n
