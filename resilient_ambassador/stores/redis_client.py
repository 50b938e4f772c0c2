"""The one place that makes redis-py clients, and the one way to call them from trio.

redis-py has no trio client and its sync client blocks whatever thread calls it, so every call
runs in a worker thread (`RedisRunner.call`) under a time budget; a call past its budget is
abandoned (the thread finishes on its own, bounded by the socket timeout) and the caller falls
back to local state. redis-py's default retries are off: with them a refused Redis took ~5 s
and a frozen one ~9 s per call (HARDENING.md), which no budget can hide from a thread pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar, final

import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from resilient_ambassador.stores.errors import StoreUnavailable

log = logging.getLogger("resilient_ambassador.redis")

T = TypeVar("T")

# Worker threads (and pooled connections) for Redis calls. A few are enough: calls are short,
# and while Redis is frozen each stuck thread is bounded by the socket timeout.
DEFAULT_MAX_THREADS = 4
# Consecutive unavailable calls before the runner stops calling Redis for a cool-down, so a
# dead or frozen Redis costs one budget per cool-down, not one per call.
DEFAULT_TRIP_AFTER = 2
DEFAULT_COOLDOWN_S = 1.0
# Ping idle pooled connections before reuse after this long (whole seconds, redis-py's unit):
# a connection to a Redis that restarted is noticed before a real command is sent on it.
HEALTH_CHECK_INTERVAL_S = 5


def make_redis(
    url: str, *, timeout_s: float = 0.25, max_connections: int = DEFAULT_MAX_THREADS
) -> redis.Redis:
    """A redis-py client for `url` (redis://, rediss://, unix://) that fails fast: connect and
    socket timeouts of `timeout_s`, no retries (Retry with 0 retries; `retry_on_timeout` left
    at its default False, since redis-py 6 deprecates passing it), a small pool. Query-string
    options in the URL win over these (redis-py's rule), so keep timeouts out of the URL.
    Creating the client does no I/O."""
    client: redis.Redis = redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        # At least the number of threads that may use it at once, or redis-py raises
        # "Too many connections" instead of waiting.
        max_connections=max_connections,
    )
    return client


@final
class RedisRunner:
    """Runs blocking redis-py calls off the trio thread, each within `budget_s`.

    Any Redis or OS error, and running out of budget, comes out as `StoreUnavailable`; a
    `ResponseError` (Redis answered, but refused the command: OOM, a script error) too, but
    it does not count against availability. After `trip_after` consecutive unavailable calls
    the runner refuses calls at once for `cooldown_s` (its own small circuit breaker), then
    lets calls through again; one success makes it healthy. Transitions are logged once each,
    never per call. Cancellation from the caller's own scopes propagates unchanged.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        budget_s: float = 0.25,
        max_threads: int = DEFAULT_MAX_THREADS,
        trip_after: int = DEFAULT_TRIP_AFTER,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.client = client
        self.budget_s = budget_s
        self._limiter = trio.CapacityLimiter(max_threads)
        self._trip_after = trip_after
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._consecutive_failures = 0
        self._skip_until: float | None = None  # on `clock`: refuse calls until then
        self._healthy = True  # optimistic until the first failure: nothing to log at start
        self.calls = 0
        self.failures = 0
        self.skipped = 0

    @classmethod
    def from_url(
        cls, url: str, *, timeout_s: float = 0.25, max_threads: int = DEFAULT_MAX_THREADS
    ) -> RedisRunner:
        """A runner with its own client: socket timeouts and call budget both `timeout_s`."""
        return cls(
            make_redis(url, timeout_s=timeout_s, max_connections=max_threads),
            budget_s=timeout_s,
            max_threads=max_threads,
        )

    @property
    def healthy(self) -> bool:
        """False from the `trip_after`th consecutive failure until the next success."""
        return self._healthy

    async def call(self, fn: Callable[[redis.Redis], T], *, budget_s: float | None = None) -> T:
        """`fn(client)` in a worker thread; its result, or StoreUnavailable."""
        if self._skip_until is not None and self._clock() < self._skip_until:
            self.skipped += 1
            raise StoreUnavailable("redis skipped: cooling down after consecutive failures")
        self.calls += 1
        client = self.client
        outcome: T
        with trio.move_on_after(self.budget_s if budget_s is None else budget_s):
            try:
                outcome = await trio.to_thread.run_sync(
                    lambda: fn(client), abandon_on_cancel=True, limiter=self._limiter
                )
            except redis.ResponseError as exc:
                # Redis is up and answered; the command itself was refused.
                self._succeeded()
                raise StoreUnavailable(f"redis refused the command: {_first_line(exc)}") from exc
            except (redis.RedisError, OSError) as exc:
                self._failed(f"{type(exc).__name__}: {_first_line(exc)}")
                raise StoreUnavailable(f"redis unavailable: {_first_line(exc)}") from exc
            self._succeeded()
            return outcome
        self._failed("no answer within the budget")
        raise StoreUnavailable("redis did not answer within the budget")

    async def aclose(self) -> None:
        """Close the pool's connections (in a thread, bounded: a stuck call may hold a lock)."""
        with trio.move_on_after(self.budget_s):
            await trio.to_thread.run_sync(self.client.close, abandon_on_cancel=True)

    def _succeeded(self) -> None:
        self._consecutive_failures = 0
        self._skip_until = None
        if not self._healthy:
            self._healthy = True
            log.info("redis reachable again: shared state resumes")

    def _failed(self, why: str) -> None:
        self.failures += 1
        self._consecutive_failures += 1
        if self._consecutive_failures < self._trip_after:
            return
        self._skip_until = self._clock() + self._cooldown_s
        if self._healthy:
            self._healthy = False
            log.warning(
                "redis unavailable (%s): using local state; calls skipped for %gs at a time until it answers",
                why,
                self._cooldown_s,
            )


def _first_line(exc: BaseException) -> str:
    # redis-py messages can carry a host:port but never a password; keep them short.
    return (str(exc).splitlines() or [""])[0][:200]
