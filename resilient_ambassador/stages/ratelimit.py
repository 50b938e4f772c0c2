"""Rate limiting stages: our own limit per route (`RateLimitStage`) and awareness of the
upstream's quota (`QuotaStage`).

Both sit inside the retry stage and outside the breaker, so every attempt takes a token and
passes the quota check, and a 429 of ours (`RateLimited`) is never retried. Neither contacts
the upstream when it says no.

Queueing is a reservation: the bucket hands out the next free slot (if it is within
`max_wait`, and within the request's deadline) and the request sleeps until then. Slots are
handed out in arrival order, so the queue is FIFO by construction, and a request whose slot is
too far away is rejected at once instead of after waiting `max_wait` in vain. A request that is
cancelled while it waits (client gone, deadline) has spent its slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

import trio

from resilient_ambassador.core.config import QuotaConfig, RateLimitConfig
from resilient_ambassador.core.errors import RateLimited, UpstreamQuotaExhausted
from resilient_ambassador.core.messages import Handler, Request, Response, header_value
from resilient_ambassador.core.quota import QuotaState, read_quota
from resilient_ambassador.core.ratelimit import (
    Decision,
    Limit,
    descriptor_key,
    policy_header,
    ratelimit_header,
)
from resilient_ambassador.stores.ratelimit import Buckets

log = logging.getLogger("resilient_ambassador.ratelimit")

# A peer's pause read back from Redis must exceed ours by this much to count as news (our own
# published pause comes back rounded to milliseconds and aged by the round trip).
PEER_PAUSE_SLACK_S = 0.05


@dataclass(slots=True)
class RateLimitStats:
    """Counters for /stats, totals since start (`waiting` is a gauge)."""

    admitted: int = 0  # went on to the upstream (queued ones included)
    rejected: int = 0  # answered 429
    queued: int = 0  # admitted after waiting for a slot
    queue_wait_s: float = 0.0  # total time spent waiting
    max_queue_wait_s: float = 0.0
    waiting: int = 0  # waiting right now
    backend_fallbacks: int = 0  # decisions made without the shared backend (filled in by the app)
    backend_round_trips: int = 0  # Redis round trips (decisions are coalesced; filled in by the app)
    backend_script_runs: int = 0  # GCRA scripts Redis ran for this route (by the app)
    backend_leased: int = 0  # decisions answered from leased tokens, without Redis (by the app)


def limit_of(config: RateLimitConfig) -> Limit:
    return Limit(config.count, config.period_s, config.burst)


def time_left_s(request: Request, now: float) -> float:
    """Until the earliest of the request's attempt deadline and the enclosing cancel scopes'
    (the retry stage's overall deadline): queueing past it would be wasted."""
    return min(request.deadline, trio.current_effective_deadline()) - now


@final
class RateLimitStage:
    """One route's rate limit: a bucket per descriptor, reject or queue when it is empty."""

    def __init__(
        self,
        inner: Handler,
        config: RateLimitConfig,
        buckets: Buckets,
        *,
        route: str,
        upstream: str,
        credential: Callable[[], str] | None = None,
    ) -> None:
        """`route`/`upstream` name the bucket scope (and the policy in headers); `credential`
        gives the fingerprint of the injected credential for `key: credential`."""
        self._inner = inner
        self.config = config
        self._buckets = buckets
        self._route = route
        self._upstream = upstream
        self._credential = credential
        self.limit = limit_of(config)
        self._policy = policy_header(route, self.limit)
        self._header = config.key_header.encode() if config.key_header else None
        self._fixed_key: str | None = None
        if config.key in ("route", "upstream"):
            self._fixed_key = descriptor_key(config.key, route if config.key == "route" else upstream)
        self.stats = RateLimitStats()
        self._queue_places = 0  # requests deciding or waiting in queue mode

    def key(self, request: Request) -> str:
        if self._fixed_key is not None:
            return self._fixed_key
        kind = self.config.key
        if kind == "client_ip":
            return descriptor_key(kind, self._route, request.client_ip)
        if kind == "header":
            assert self._header is not None
            # No header: one shared bucket for every client that sends none.
            return descriptor_key(kind, self._route, header_value(request.headers, self._header) or b"")
        credential = self._credential() if self._credential is not None else ""
        return descriptor_key(kind, self._upstream, credential.encode())

    async def __call__(self, request: Request) -> Response:
        config = self.config
        # A queue place is held from before the decision (a Redis decision takes a round trip,
        # and requests deciding meanwhile must count against max_queue too) until the wait ends.
        if config.mode == "queue" and self._queue_places < config.max_queue:
            max_wait_s = min(config.max_wait_s, time_left_s(request, trio.current_time()))
            self._queue_places += 1
            try:
                await self._admit(request, max(0.0, max_wait_s))
            finally:
                self._queue_places -= 1
        else:
            await self._admit(request, 0.0)
        return await self._inner(request)

    async def _admit(self, request: Request, max_wait_s: float) -> None:
        """Take a token (waiting for a reserved slot if need be) or raise RateLimited."""
        stats = self.stats
        decision = await self._buckets.acquire(self.key(request), self.limit, max_wait_s)
        if not decision.allowed:
            stats.rejected += 1
            request.outcome.rate_limit = "rejected"
            raise self._rejection(decision)
        if decision.wait_s > 0:
            request.outcome.rate_limit = "queued"
            stats.queued += 1
            stats.waiting += 1
            try:
                await trio.sleep(decision.wait_s)
            finally:
                stats.waiting -= 1
            stats.queue_wait_s += decision.wait_s
            stats.max_queue_wait_s = max(stats.max_queue_wait_s, decision.wait_s)
            request.outcome.rate_limit_wait_s += decision.wait_s
        else:
            request.outcome.rate_limit = "allowed"
        stats.admitted += 1

    def _rejection(self, decision: Decision) -> RateLimited:
        config = self.config
        rate = f"{config.count:g}/{config.period_s:g}s"
        return RateLimited(
            f"rate limit of {rate} (burst {config.burst}) for route {self._route!r} reached",
            upstream=self._upstream,
            retry_after_s=decision.retry_after_s,
            headers=(
                (b"ratelimit-policy", self._policy),
                (b"ratelimit", ratelimit_header(self._route, decision)),
            ),
        )


@dataclass(slots=True)
class QuotaStats:
    observed: int = 0  # upstream responses that announced something about the quota
    paused: int = 0  # times the upstream told us to stop
    held: int = 0  # requests that waited for a pause or a pacing slot
    rejected: int = 0  # requests answered 429 because the quota was spent
    hold_s: float = 0.0


@final
class QuotaTracker:
    """One upstream's quota as announced by its responses, shared by all its routes.
    `on_pause` (set by the app when the pause is shared through Redis) hears of every pause
    this process decides on its own."""

    def __init__(
        self,
        upstream: str,
        config: QuotaConfig,
        *,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.upstream = upstream
        self.config = config
        self.state = QuotaState(config.pace_below)
        self.stats = QuotaStats()
        self._clock = clock
        self._wall_clock = wall_clock
        self.on_pause: Callable[[float], None] | None = None

    def observe(self, response: Response) -> None:
        observation = read_quota(response.status, response.headers, self._wall_clock())
        if observation is None:
            return
        self.stats.observed += 1
        now = self._clock()
        before = self.state.paused_until
        self.state.observe(observation, now)
        if self.state.paused_until > before and self.state.paused_until > now:
            self.stats.paused += 1
            pause_s = self.state.paused_until - now
            log.warning(
                "upstream %s says its quota is spent: holding its traffic for %.1fs", self.upstream, pause_s
            )
            if self.on_pause is not None:
                self.on_pause(pause_s)

    def pause_from_peer(self, pause_s: float) -> bool:
        """Another daemon saw the upstream's quota run out (read back from Redis); True when
        that holds traffic here longer than it already was."""
        now = self._clock()
        # Our own published pause comes back a little shorter; only a longer one is news.
        if pause_s <= self.state.paused_for(now) + PEER_PAUSE_SLACK_S:
            return False
        self.state.pause(pause_s, now)
        log.warning(
            "upstream %s quota spent (seen by another daemon): holding its traffic for %.1fs",
            self.upstream,
            pause_s,
        )
        return True


@final
class QuotaStage:
    """Holds requests while the upstream's quota is spent or running low (see QuotaTracker)."""

    def __init__(self, inner: Handler, tracker: QuotaTracker) -> None:
        self._inner = inner
        self.tracker = tracker

    async def __call__(self, request: Request) -> Response:
        tracker = self.tracker
        config, stats = tracker.config, tracker.stats
        now = trio.current_time()
        max_wait_s = 0.0 if config.mode == "reject" else min(config.max_wait_s, time_left_s(request, now))
        go, wait_s = tracker.state.reserve(now, max(0.0, max_wait_s))
        if not go:
            stats.rejected += 1
            request.outcome.rate_limit = "quota_exhausted"
            raise UpstreamQuotaExhausted(
                f"upstream {tracker.upstream!r} quota is spent; holding its traffic for {wait_s:.1f}s",
                upstream=tracker.upstream,
                retry_after_s=wait_s,
            )
        if wait_s > 0:
            stats.held += 1
            stats.hold_s += wait_s
            request.outcome.rate_limit = "quota_held"
            request.outcome.rate_limit_wait_s += wait_s
            await trio.sleep(wait_s)
        response = await self._inner(request)
        tracker.observe(response)
        return response
