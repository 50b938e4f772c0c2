"""Token buckets (GCRA, see core.ratelimit) behind one small protocol: in memory, per process,
or in Redis, shared by every daemon that uses it.

Redis: one Lua script per decision (EVALSHA, EVAL where a server answers NOSCRIPT: see
`LuaScript`), so there is no read-modify-write race between processes; the script reads Redis
`TIME`, so all processes share one clock whatever their own clocks say. One key per bucket,
`<prefix>rl:{<hash of the descriptor>}`, holding the TAT and expiring when the bucket would be
full again (an absent key and a full bucket are the same thing, so idle keys cost nothing).
The braces are a Redis Cluster hash tag: anything kept next to a bucket later shares its slot,
and buckets spread over the Cluster's masters by their hash.

Redis calls go through the daemon's one `RedisRunner` (off the trio thread, budgeted, with its
own small breaker). Decisions that arrive while one is in flight are coalesced: the next call
sends all of them in one pipeline, so a busy daemon pays one thread hop and one round trip per
batch, not per request (each decision is still its own atomic script run).

With `lease` N (reject mode only), a decision that finds no token held here asks the same
script for N tokens at once (partially granted near the limit), uses one and keeps the rest in
memory per bucket, admitting locally while any is usable; requests that arrive while a lease
is on its way wait for it instead of asking too. Held tokens are usable for LEASE_TTL_S
(core.ratelimit.Leased): any window admits at most `(N - 1) x processes` more than the bucket
alone would, and at most that many tokens per bucket sit idle. About 1/N round trips per
request.

When Redis does not answer, `on_failure` decides: `local` falls back to an in-memory bucket
with this process's share of the rate, `allow` admits, `deny` refuses. The next call after the
runner's cool-down tries Redis again, so it recovers by itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, final

import trio

from resilient_ambassador.core.ratelimit import (
    Decision,
    Leased,
    Limit,
    decision_from,
    gcra,
    leased_after,
)
from resilient_ambassador.stores.errors import StoreUnavailable
from resilient_ambassador.stores.redis_client import LuaScript, RedisClient, RedisRunner

log = logging.getLogger("resilient_ambassador.ratelimit")

# The in-memory store forgets buckets that are full again once it holds more than this many
# (and then twice what it kept), so per-client keys cannot grow without bound.
PRUNE_MIN_KEYS = 4096
# What a refused decision tells the client to wait when Redis is down and on_failure is deny:
# about the runner's cool-down, after which Redis is tried again.
DENY_RETRY_AFTER_S = 1.0
# Decisions sent in one pipeline at most; more wait for the next round trip.
MAX_BATCH = 128

# KEYS[1] the bucket; ARGV: interval_s, burst, max_wait_s, want. The same maths and epsilon as
# core.ratelimit.gcra for the first token; returns {granted, wait_s, ahead_s} for decision_from
# (numbers as strings: Lua numbers come back to redis-py truncated to integers). %.6f keeps the
# microseconds of an epoch-sized float, where tostring() would round to 14 digits.
# `want` > 1 is a lease: GCRA with a cost, up to `want` tokens when the first one is admitted,
# as many as fit within the burst (and max_wait), the TAT moving on by `granted * interval`.
GCRA_LUA = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local want = tonumber(ARGV[4] or '1') or 1
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local base = math.max(tat, now)
local wait = base + interval - burst * interval - now
if wait > max_wait + 0.000001 then
  return {0, string.format('%.6f', wait), string.format('%.6f', tat - now)}
end
local granted = 1
if want > 1 then
  local fit = math.floor((now + max_wait + 0.000001 + burst * interval - base) / interval)
  granted = math.max(1, math.min(want, fit))
end
local new_tat = base + granted * interval
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1)
return {granted, string.format('%.6f', wait), string.format('%.6f', new_tat - now)}
"""


class Buckets(Protocol):
    """Where buckets live. `acquire` takes one token from bucket `key` now, or reserves one up
    to `max_wait_s` ahead (the caller then waits `decision.wait_s`)."""

    async def acquire(self, key: str, limit: Limit, max_wait_s: float) -> Decision: ...


@final
class MemoryBuckets:
    """Buckets in this process, on `clock` (trio's, so MockClock drives them in tests)."""

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._prune_above = PRUNE_MIN_KEYS

    def __len__(self) -> int:
        return len(self._tats)

    def take(self, key: str, limit: Limit, max_wait_s: float) -> Decision:
        """The decision, synchronously (no await: nothing can interleave with it)."""
        now = self._clock()
        decision, tat = gcra(self._tats.get(key, -math.inf), now, limit, max_wait_s)
        if decision.allowed:
            self._tats[key] = tat
            if len(self._tats) > self._prune_above:
                self._tats = {k: t for k, t in self._tats.items() if t > now}
                self._prune_above = max(PRUNE_MIN_KEYS, 2 * len(self._tats))
        return decision

    async def acquire(self, key: str, limit: Limit, max_wait_s: float) -> Decision:
        return self.take(key, limit, max_wait_s)


OnFailure = Literal["local", "allow", "deny"]


@dataclass(slots=True)
class _Pending:
    """One decision waiting for a batch: its script arguments, then its reply or error."""

    key: str
    args: list[str]
    done: trio.Event = field(default_factory=trio.Event)
    reply: Any = None
    error: Exception | None = None
    answered: bool = False


@dataclass(slots=True)
class _Ask:
    """A lease request on its way; `spare` tokens of it not yet promised to a waiter."""

    spare: int
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(slots=True)
class _Held:
    """One bucket's leased tokens here (in slot order) and its lease requests in flight."""

    leases: list[Leased] = field(default_factory=list)
    asks: list[_Ask] = field(default_factory=list)

    def take(self, now: float) -> bool:
        while self.leases:
            if self.leases[0].take(now):
                return True
            del self.leases[0]
        return False

    def usable(self, now: float) -> int:
        return sum(lease.usable(now) for lease in self.leases)


@final
class RedisBuckets:
    """Buckets in Redis, shared by every process using it; `on_failure` when it is away.

    `local_share` is this process's share of the rate for the `local` fallback: 1 /
    `expected_replicas`, so N replicas falling back together still stay near the limit.
    `lease` > 1 takes that many tokens per round trip for reject-mode decisions (module
    docstring); `clock` times the leases (trio's, so MockClock drives them in tests).
    """

    def __init__(
        self,
        runner: RedisRunner,
        *,
        key_prefix: str = "ra:",
        on_failure: OnFailure = "local",
        local_share: float = 1.0,
        fallback: MemoryBuckets | None = None,
        lease: int = 0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._runner = runner
        self._prefix = key_prefix + "rl:"
        self._on_failure = on_failure
        self._share = local_share
        self._fallback = fallback or MemoryBuckets()
        self._script = LuaScript(GCRA_LUA)
        self.fallbacks = 0  # decisions made without Redis
        self.round_trips = 0  # batches sent (decisions / round_trips = mean batch size)
        self.script_runs = 0  # scripts sent to Redis (its work: one per decision, or per lease)
        self.leased = 0  # decisions answered from a lease held here, without Redis
        self._lease = lease
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._prune_above = PRUNE_MIN_KEYS
        self._degraded = False
        self._queue: list[_Pending] = []
        self._leading = False  # a batch is in flight; its leader starts the next one

    async def acquire(self, key: str, limit: Limit, max_wait_s: float) -> Decision:
        if self._lease > 1 and max_wait_s <= 0:
            return await self._acquire_leased(key, limit)
        decision, _ = await self._decide(key, limit, max_wait_s, 1)
        return decision

    async def _acquire_leased(self, key: str, limit: Limit) -> Decision:
        """A token held here, or one promised by a lease on its way, or a new lease."""
        while True:
            held = self._held.setdefault(key, _Held())
            now = self._clock()
            if held.take(now):
                self.leased += 1
                return Decision(True, remaining=held.usable(now))
            ask = next((a for a in held.asks if a.spare > 0), None)
            if ask is None:
                break
            ask.spare -= 1  # one of its tokens is ours; look again when it is back
            await ask.done.wait()
        ask = _Ask(self._lease - 1)
        held.asks.append(ask)
        sent_at = self._clock()
        try:
            decision, granted = await self._decide(key, limit, 0.0, self._lease)
            if granted > 1:
                held.leases.append(leased_after(granted, sent_at))
                held.leases.sort(key=lambda lease: lease.until)
        finally:
            held.asks.remove(ask)
            ask.done.set()
        self._prune_held()
        return decision

    def _prune_held(self) -> None:
        """Forget buckets with nothing usable and nothing asked once there are many, so
        per-client keys cannot grow without bound (as MemoryBuckets does)."""
        if len(self._held) <= self._prune_above:
            return
        now = self._clock()
        self._held = {k: h for k, h in self._held.items() if h.asks or h.usable(now)}
        self._prune_above = max(PRUNE_MIN_KEYS, 2 * len(self._held))

    async def _decide(self, key: str, limit: Limit, max_wait_s: float, want: int) -> tuple[Decision, int]:
        """One script run, batched: the decision and the tokens granted (0 refused; more than
        one only when `want` asks for a lease)."""
        item = _Pending(
            f"{self._prefix}{{{key}}}",
            [repr(limit.interval_s), str(limit.burst), repr(max(0.0, max_wait_s)), str(want)],
        )
        self._queue.append(item)
        try:
            if self._leading:
                await item.done.wait()  # answered by a batch, or woken to lead the next one
            if not item.answered:
                await self._send_batch()
        except BaseException:
            self._abandon(item)
            raise
        try:
            if item.error is not None:
                raise item.error
            reply = item.reply
            granted, wait_s, ahead_s = int(reply[0]), float(reply[1]), float(reply[2])
        except (StoreUnavailable, TypeError, ValueError, IndexError) as exc:
            decision = self._without_redis(key, limit, max_wait_s, exc)
            return decision, int(decision.allowed)
        if self._degraded:
            self._degraded = False
            log.info("rate limits are shared through redis again")
        return decision_from(granted > 0, wait_s, ahead_s, limit), granted

    async def _send_batch(self) -> None:
        """Send the queued decisions (ours first) in one pipeline, answer them all, and wake the
        next waiter to lead the batch after. Shielded: the others depend on this call, which
        the runner bounds by its budget anyway."""
        self._leading = True
        batch = self._queue[:MAX_BATCH]
        del self._queue[:MAX_BATCH]
        try:
            with trio.CancelScope(shield=True):
                replies = await self._runner.call(self._pipeline([(i.key, i.args) for i in batch]))
            self.round_trips += 1
            self.script_runs += len(batch)
            for item, reply in zip(batch, replies, strict=True):
                if isinstance(reply, Exception):
                    item.error = StoreUnavailable(f"redis refused the script: {reply}")
                else:
                    item.reply = reply
        except StoreUnavailable as exc:
            for item in batch:
                item.error = exc
        finally:
            for item in batch:
                item.answered = True
                item.done.set()
            self._next_leader()

    def _next_leader(self) -> None:
        if self._queue:
            self._queue[0].done.set()  # it wakes unanswered and sends the next batch
        else:
            self._leading = False

    def _abandon(self, item: _Pending) -> None:
        """A caller cancelled before its batch went out: drop its decision, and if it had been
        woken to lead, pass that on so nobody waits for a leader that is gone."""
        if item in self._queue:
            self._queue.remove(item)
            if item.done.is_set():
                self._next_leader()

    def _pipeline(self, batch: list[tuple[str, list[str]]]) -> Callable[[RedisClient], list[Any]]:
        script = self._script
        calls = [([key], args) for key, args in batch]
        return lambda client: script.run_batch(client, calls)

    def _without_redis(self, key: str, limit: Limit, max_wait_s: float, exc: Exception) -> Decision:
        self.fallbacks += 1
        if not self._degraded:
            self._degraded = True
            log.warning(
                "rate limit decisions without redis (%s): on_backend_failure=%s", exc, self._on_failure
            )
        if self._on_failure == "allow":
            return Decision(True, remaining=limit.burst, reset_s=0.0)
        if self._on_failure == "deny":
            return Decision(False, retry_after_s=DENY_RETRY_AFTER_S)
        return self._fallback.take(key, limit.scaled(self._share), max_wait_s)
