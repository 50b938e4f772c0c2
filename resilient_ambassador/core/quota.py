"""Upstream-quota awareness: what an upstream's rate-limit headers say, and what to do about it.

Upstreams announce their quota in several dialects; `read_quota` understands the common ones:

- IETF (draft-ietf-httpapi-ratelimit-headers): `RateLimit: "p";r=10;t=30` and
  `RateLimit-Policy: "p";q=100;w=60` (several policies: the most restrictive one counts);
- the older drafts and most APIs: `RateLimit-Limit/-Remaining/-Reset` and
  `X-RateLimit-Limit/-Remaining/-Reset` (GitHub, Twitter); a Reset above 10^9 is an epoch
  time in seconds, anything smaller a number of seconds;
- `Retry-After` (RFC 9110 10.2.3) on a 429 or 503.

`QuotaState` turns those observations into a decision per request: go now, wait (paused
until the reset, or paced so the last requests of a low quota spread out until the reset), and
for how long. Pure: every call takes `now` (trio's clock) and, where headers carry dates,
`now_epoch_s`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import final

from resilient_ambassador.core.retry import parse_retry_after

# A Reset value above this is a Unix time, not a delay (10^9 s is 31 years).
EPOCH_THRESHOLD_S = 1_000_000_000
# A 429 that says nothing about when to come back pauses this long: enough to stop a burst
# from hammering the upstream, short enough not to matter if it was a one-off.
DEFAULT_PAUSE_S = 1.0
# Longest pause or reset we believe (a day): a bogus header must not stop traffic for a year.
MAX_PAUSE_S = 86_400.0
PAUSE_STATUSES = frozenset({429, 503})

_ITEM_PARAM_RE = re.compile(r";\s*([a-z*][a-z0-9_.*-]*)\s*=\s*(-?[0-9]+(?:\.[0-9]+)?)")
_INT_RE = re.compile(r"\s*([0-9]{1,15})\s*")


@final
@dataclass(frozen=True, slots=True)
class QuotaObservation:
    """What one upstream response said about the quota (None: not said)."""

    limit: int | None = None
    remaining: int | None = None
    reset_s: float | None = None  # seconds until the quota resets
    pause_s: float | None = None  # the upstream asked us to stop for this long (429/503)


def read_quota(
    status: int, headers: list[tuple[bytes, bytes]], now_epoch_s: float
) -> QuotaObservation | None:
    """The quota an upstream response announces, or None when it announces nothing."""
    values: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in _INTERESTING:
            values.setdefault(name, value)  # the first of repeated fields, like header_value
    if not values and status not in PAUSE_STATUSES:
        return None
    limit = remaining = None
    reset_s = None
    if b"ratelimit" in values:
        remaining, reset_s = _ietf_ratelimit(values[b"ratelimit"])
    if b"ratelimit-policy" in values:
        limit = _ietf_policy(values[b"ratelimit-policy"])
    for prefix in (b"ratelimit-", b"x-ratelimit-"):
        if limit is None:
            limit = _int(values.get(prefix + b"limit"))
        if remaining is None:
            remaining = _int(values.get(prefix + b"remaining"))
        if reset_s is None:
            reset_s = _reset(values.get(prefix + b"reset"), now_epoch_s)
    pause_s = None
    if status in PAUSE_STATUSES:
        retry_after = values.get(b"retry-after")
        if retry_after is not None:
            pause_s = parse_retry_after(retry_after, now_epoch_s)
        if pause_s is None and status == 429:
            pause_s = reset_s if reset_s is not None and remaining in (None, 0) else DEFAULT_PAUSE_S
    if pause_s is not None:
        pause_s = min(pause_s, MAX_PAUSE_S)
    if reset_s is not None:
        reset_s = min(reset_s, MAX_PAUSE_S)
    if limit is remaining is reset_s is pause_s is None:
        return None
    return QuotaObservation(limit, remaining, reset_s, pause_s)


_INTERESTING = frozenset(
    {
        b"ratelimit",
        b"ratelimit-policy",
        b"ratelimit-limit",
        b"ratelimit-remaining",
        b"ratelimit-reset",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
        b"retry-after",
    }
)


def _items(value: bytes) -> list[dict[str, float]]:
    """The parameters of each member of a structured-field List, leniently: `"p";r=1;t=2, ...`."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return []
    out = []
    for member in text.split(","):
        params = {k: float(v) for k, v in _ITEM_PARAM_RE.findall(member)}
        if params:
            out.append(params)
    return out


def _ietf_ratelimit(value: bytes) -> tuple[int | None, float | None]:
    """(remaining, reset_s) of the most restrictive policy in a `RateLimit` field."""
    best: tuple[int | None, float | None] = (None, None)
    for params in _items(value):
        r, t = params.get("r"), params.get("t")
        if r is None or r < 0 or (t is not None and t < 0):
            continue
        if best[0] is None or r < best[0]:
            best = (int(r), t)
    return best


def _ietf_policy(value: bytes) -> int | None:
    quotas = [int(p["q"]) for p in _items(value) if p.get("q", -1) > 0]
    return min(quotas) if quotas else None


def _int(value: bytes | None) -> int | None:
    if value is None:
        return None
    m = _INT_RE.fullmatch(value.decode("latin-1"))
    return int(m[1]) if m else None


def _reset(value: bytes | None, now_epoch_s: float) -> float | None:
    number = _int(value)
    if number is None:
        return None
    if number > EPOCH_THRESHOLD_S:
        return max(0.0, number - now_epoch_s)
    return float(number)


@final
class QuotaState:
    """One upstream's quota as last announced, and the pacing it calls for.

    Paused: the upstream said stop (429/503 with Retry-After, or Remaining 0 with a Reset):
    every request waits until then. Paced: Remaining is at or below `pace_below` of the limit:
    requests are spaced `reset / remaining` apart so the rest of the quota lasts until the
    reset instead of going in one burst and leaving a wall of 429s.
    """

    def __init__(self, pace_below: float = 0.1) -> None:
        self.pace_below = pace_below
        self.paused_until = -math.inf
        self._pace_interval_s = 0.0
        self._pace_until = -math.inf  # pacing applies until the announced reset
        self._next_slot = -math.inf
        self._limit: int | None = None

    def observe(self, observation: QuotaObservation, now: float) -> None:
        obs = observation
        if obs.limit is not None:
            self._limit = obs.limit
        if obs.pause_s is not None:
            self.pause(obs.pause_s, now)
            return
        if obs.remaining is None or obs.reset_s is None:
            return
        if obs.remaining == 0:
            self.pause(obs.reset_s, now)
            return
        limit = self._limit
        if limit is not None and obs.remaining <= max(1, math.ceil(limit * self.pace_below)):
            self._pace_interval_s = obs.reset_s / obs.remaining
            self._pace_until = now + obs.reset_s
        else:
            self._pace_interval_s = 0.0
            self._pace_until = -math.inf

    def pause(self, seconds: float, now: float) -> None:
        """Hold everything for `seconds` (a later pause never shortens an earlier one)."""
        self.paused_until = max(self.paused_until, now + min(seconds, MAX_PAUSE_S))

    def paused_for(self, now: float) -> float:
        return max(0.0, self.paused_until - now)

    def reserve(self, now: float, max_wait_s: float) -> tuple[bool, float]:
        """(go, wait_s): go after `wait_s`, or (False, wait_s) when the wait would exceed
        `max_wait_s` (nothing is reserved then)."""
        wait_s = self.paused_for(now)
        if now < self._pace_until and self._pace_interval_s > 0:
            slot = max(self._next_slot, now + wait_s)
            wait_s = slot - now
            if wait_s > max_wait_s:
                return False, wait_s
            self._next_slot = slot + self._pace_interval_s
            return True, wait_s
        return wait_s <= max_wait_s, wait_s
