"""Shares "the upstream's quota is spent until T" between daemons through Redis.

When one daemon sees an upstream 429 with Retry-After (or Remaining 0), every daemon using the
same credential is about to get the same answer: one background task per daemon writes the
pause to Redis and reads everyone's pauses back every `interval_s`, so the others hold their
traffic too instead of each spending a request to learn it. Requests never wait on Redis: a
pause only marks work for the task.

One key per upstream, `<prefix>quota:{<sha256(upstream)[:16]>}`, whose TTL is the pause (Redis's
clock decides, so skew between pods does not matter); a longer pause replaces a shorter one,
never the other way round.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Callable
from typing import Any, Protocol, final

import trio

from resilient_ambassador.stores.errors import StoreUnavailable
from resilient_ambassador.stores.redis_client import LuaScript, RedisClient, RedisRunner

log = logging.getLogger("resilient_ambassador.ratelimit")

DEFAULT_INTERVAL_S = 0.5

# Extend, never shorten: set the pause only if the key's remaining TTL is shorter.
_EXTEND_LUA = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class SharedQuota(Protocol):
    """The part of a quota tracker the sync needs (stages.ratelimit.QuotaTracker)."""

    @property
    def upstream(self) -> str: ...

    on_pause: Callable[[float], None] | None

    def pause_from_peer(self, pause_s: float) -> bool: ...


@final
class SharedQuotaSync:
    """Publishes local pauses and applies everyone else's; one per daemon, started with `run`."""

    def __init__(
        self,
        runner: RedisRunner,
        *,
        key_prefix: str = "ra:",
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._runner = runner
        self._prefix = key_prefix
        self._interval_s = interval_s
        self._clock = clock
        self._trackers: dict[str, SharedQuota] = {}
        self._pending: dict[str, float] = {}  # upstream -> pause end on `clock`
        self._wake = trio.Event()
        self._extend = LuaScript(_EXTEND_LUA)
        self.replica_id = secrets.token_hex(6)
        self.published = 0
        self.applied = 0
        self.sync_errors = 0

    def key(self, upstream: str) -> str:
        return f"{self._prefix}quota:{{{hashlib.sha256(upstream.encode()).hexdigest()[:16]}}}"

    def register(self, tracker: SharedQuota) -> None:
        name = tracker.upstream
        self._trackers[name] = tracker
        tracker.on_pause = lambda pause_s: self._on_pause(name, pause_s)

    def _on_pause(self, upstream: str, pause_s: float) -> None:
        until = self._clock() + pause_s
        self._pending[upstream] = max(until, self._pending.get(upstream, -math.inf))
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sync until cancelled. Reports started at once: Redis is never waited for."""
        task_status.started()
        next_poll = self._clock()
        while True:
            self._wake = trio.Event()
            try:
                await self._flush()
                if self._clock() >= next_poll:
                    await self._poll()
                    next_poll = self._clock() + self._interval_s
            except StoreUnavailable as exc:
                self.sync_errors += 1
                log.debug("shared quota not synced: %s", exc)
                next_poll = self._clock() + self._interval_s
            except Exception:
                # A bug here must not take the daemon down: quotas work locally without it.
                log.exception("shared quota sync failed; retrying in %gs", self._interval_s)
                next_poll = self._clock() + self._interval_s
            with trio.move_on_at(next_poll):
                await self._wake.wait()

    async def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for upstream, until in pending.items():
            px = math.ceil((until - self._clock()) * 1000)
            if px <= 0:
                continue
            try:
                await self._runner.call(self._extender(self.key(upstream), px))
            except StoreUnavailable:
                # Keep it for the next round unless a newer pause replaced it meanwhile.
                self._pending[upstream] = max(until, self._pending.get(upstream, -math.inf))
                raise
            self.published += 1

    def _extender(self, key: str, px: int) -> Callable[[RedisClient], Any]:
        script, value = self._extend, self.replica_id

        def extend(client: RedisClient) -> Any:
            return script(client, [key], [value, px])

        return extend

    async def _poll(self) -> None:
        names = list(self._trackers)
        if not names:
            return
        keys = [self.key(name) for name in names]

        def read(client: RedisClient) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.pttl(key)
            return pipe.execute()

        for name, pttl_ms in zip(names, await self._runner.call(read), strict=True):
            if (
                isinstance(pttl_ms, int)
                and pttl_ms > 0
                and self._trackers[name].pause_from_peer(pttl_ms / 1000)
            ):
                self.applied += 1
