"""Shares open circuit breakers between replicas through Redis (docs/shared-breaker.md).

Each breaker keeps its state in memory and decides on its own; one background task per daemon
(`SharedBreakerSync.run`) copies "this upstream is open for N more seconds" to Redis when a
breaker opens on its own failures, reads everyone's entries back every `sync_interval_s`, and
opens a closed local breaker when another replica has one open. Requests never wait on Redis:
transitions only mark work for the task, and a Redis that is down, frozen or slow costs the
task its budget while every breaker keeps working locally.

Redis layout, one key per upstream: `<prefix>breaker:{<sha256(upstream)[:16]>}` (the braces
are a Redis Cluster hash tag; the name is hashed so nothing from config reaches a key
unescaped), a small JSON value, and a PX expiry equal to the time left until half-open. The
key's TTL, read with PTTL, is the shared open period: Redis's clock decides, so wall-clock skew
between pods does not matter. `open_until` in the value (wall clock) is for humans only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, final

import trio

from resilient_ambassador.core.config import BreakerConfig
from resilient_ambassador.stores.errors import StoreUnavailable
from resilient_ambassador.stores.redis_client import LuaScript, RedisClient, RedisRunner

log = logging.getLogger("resilient_ambassador.redis")

DEFAULT_SYNC_INTERVAL_S = 0.5
# A missing entry for a breaker that is still open here is written again (Redis restarted,
# evicted it, or our write was lost) unless the open period is nearly over anyway.
MIN_REPUBLISH_S = 0.1
# Entries are small; anything bigger is not ours and is ignored unparsed.
MAX_VALUE_BYTES = 1024

# Delete the key only if it still holds the value we mean: never another replica's newer open.
_CAS_DELETE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class BreakerChangeView(Protocol):
    """What the sync reads from a breaker's change event (stages.breaker.BreakerChange)."""

    @property
    def state(self) -> str: ...
    @property
    def forced(self) -> bool: ...


class SharedBreaker(Protocol):
    """The part of a breaker the sync needs (stages.breaker.BreakerStage); a protocol, so this
    layer does not import stages."""

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> BreakerConfig: ...
    @property
    def state(self) -> str: ...
    def time_until_half_open(self) -> float: ...
    def open_for(self, remaining_s: float) -> bool: ...
    def add_change_hook(self, hook: Callable[[BreakerChangeView], None]) -> None: ...


@dataclass(slots=True)
class _Upstream:
    breaker: SharedBreaker
    key: str
    pending: Literal["publish", "republish", "clear"] | None = None
    clear_value: bytes | None = None  # what "clear" deletes, if the key still holds it
    known_value: bytes | None = None  # the entry we wrote, or last saw while not closed
    superseded_value: bytes | None = None  # an entry our own successful probe outdated
    own_open: bool = False  # open on this replica's own failures (so the entry is ours to keep)


@final
class SharedBreakerSync:
    """Syncs every registered breaker with Redis; one per daemon, started with `run`.

    Opening is shared: an open here is written to Redis, and a closed breaker that finds
    another replica's open entry opens for the entry's remaining TTL. Closing is per replica:
    each replica probes on its own after its open period, and a successful probe deletes the
    entry it knew of (compare-and-delete by value), so replicas that have not picked it up yet
    and new replicas do not open needlessly. Own entries, and entries a successful probe here
    outdated, never open the local breaker.
    """

    def __init__(
        self,
        runner: RedisRunner,
        *,
        key_prefix: str = "ra:",
        sync_interval_s: float | None = None,
        replica_id: str | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        """`sync_interval_s` None: the smallest `sync_interval_s` of the registered breakers.
        `replica_id`: written into entries for operators (random if None); keep it free of
        secrets."""
        self._runner = runner
        self._prefix = key_prefix
        self._sync_interval_s = sync_interval_s
        self.replica_id = replica_id or secrets.token_hex(6)
        self._clock = clock
        self._upstreams: dict[str, _Upstream] = {}
        self._wake = trio.Event()
        self._cas_delete = LuaScript(_CAS_DELETE_LUA)
        self.published = 0
        self.cleared = 0
        self.forced_opens = 0
        self.sync_errors = 0

    def key(self, upstream: str) -> str:
        digest = hashlib.sha256(upstream.encode()).hexdigest()[:16]
        return f"{self._prefix}breaker:{{{digest}}}"

    @property
    def sync_interval_s(self) -> float:
        if self._sync_interval_s is not None:
            return self._sync_interval_s
        intervals = [u.breaker.config.sync_interval_s for u in self._upstreams.values()]
        return min(intervals, default=DEFAULT_SYNC_INTERVAL_S)

    def register(self, breaker: SharedBreaker) -> None:
        """Share `breaker` (before `run` starts, or while it runs)."""
        if breaker.name in self._upstreams:
            raise ValueError(f"upstream {breaker.name!r} is already registered")
        upstream = _Upstream(breaker, self.key(breaker.name))
        self._upstreams[breaker.name] = upstream
        breaker.add_change_hook(lambda change: self._on_change(upstream, change))
        if breaker.state == "open":  # registered late: share what is already known
            self._on_change(upstream, _Opened())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sync until cancelled. Reports started at once: Redis is never waited for."""
        task_status.started()
        next_poll = self._clock()
        while True:
            self._wake = trio.Event()  # hooks firing from here on wake the wait below
            try:
                await self._flush()
                if self._clock() >= next_poll:
                    await self._poll()
                    next_poll = self._clock() + self.sync_interval_s
                    await self._flush()  # the poll may have found entries to write again
            except Exception:
                # A bug here must not take the daemon down: breakers work without the sync.
                log.exception("shared breaker sync failed; retrying in %gs", self.sync_interval_s)
                next_poll = self._clock() + self.sync_interval_s
                await trio.sleep(self.sync_interval_s)
            with trio.move_on_at(next_poll):
                await self._wake.wait()

    # -- hooks: on the request path, so they only mark work ----------------------------------

    def _on_change(self, upstream: _Upstream, change: BreakerChangeView) -> None:
        if change.state == "open":
            upstream.own_open = not change.forced
            if upstream.own_open:
                upstream.pending = "publish"
                self._wake.set()
        elif change.state == "closed":
            # A probe succeeded: it outdates every open we knew of for this upstream.
            upstream.own_open = False
            if upstream.known_value is not None:
                upstream.superseded_value = upstream.known_value
                upstream.clear_value = upstream.known_value
                upstream.known_value = None
                upstream.pending = "clear"
                self._wake.set()
            elif upstream.pending != "clear":
                upstream.pending = None
        # half-open: the probe decides; nothing to share yet.

    # -- the task ------------------------------------------------------------------------------

    async def _flush(self) -> None:
        for upstream in list(self._upstreams.values()):
            action = upstream.pending
            if action is None:
                continue
            upstream.pending = None
            try:
                if action == "clear":
                    await self._clear(upstream)
                else:
                    await self._publish(upstream, only_if_missing=action == "republish")
            except StoreUnavailable as exc:
                self.sync_errors += 1
                log.debug("shared breaker %s for %s not synced: %s", action, upstream.breaker.name, exc)
                if upstream.pending is None:  # nothing newer: try again on the next round
                    upstream.pending = action
                return  # Redis is not answering: do not spend a budget per upstream

    async def _publish(self, upstream: _Upstream, *, only_if_missing: bool) -> None:
        breaker = upstream.breaker
        remaining_s = breaker.time_until_half_open()  # now, not when it opened: queueing is free
        if breaker.state != "open" or remaining_s <= 0 or not upstream.own_open:
            return
        value = json.dumps(
            {
                "v": 1,
                "replica": self.replica_id,
                "token": secrets.token_hex(8),  # makes every entry's value unique
                "open_for_s": round(remaining_s, 3),
                "open_until": round(time.time() + remaining_s, 3),  # for humans; TTL decides
            },
            separators=(",", ":"),
        ).encode()
        key, px = upstream.key, max(1, math.ceil(remaining_s * 1000))

        def write(client: RedisClient) -> Any:
            return client.set(key, value, px=px, nx=only_if_missing)

        if await self._runner.call(write):
            upstream.known_value = value
            self.published += 1

    async def _clear(self, upstream: _Upstream) -> None:
        key, value, script = upstream.key, upstream.clear_value, self._cas_delete
        if value is None:
            return

        def cas_delete(client: RedisClient) -> Any:
            return script(client, [key], [value])

        if await self._runner.call(cas_delete):
            self.cleared += 1
        upstream.clear_value = None

    async def _poll(self) -> None:
        upstreams = list(self._upstreams.values())
        if not upstreams:
            return
        keys = [u.key for u in upstreams]

        def read(client: RedisClient) -> list[Any]:
            pipe = client.pipeline(transaction=False)  # one round trip; per key, so Cluster-safe
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            return pipe.execute()

        try:
            replies = await self._runner.call(read)
        except StoreUnavailable as exc:
            self.sync_errors += 1
            log.debug("shared breakers not read: %s", exc)
            return
        for i, upstream in enumerate(upstreams):
            self._apply(upstream, replies[2 * i], replies[2 * i + 1])

    def _apply(self, upstream: _Upstream, value: object, pttl_ms: object) -> None:
        breaker = upstream.breaker
        if value is None:
            if (
                upstream.own_open
                and upstream.pending is None
                and breaker.time_until_half_open() > MIN_REPUBLISH_S
            ):
                upstream.pending = "republish"
            return
        if not isinstance(value, bytes) or not isinstance(pttl_ms, int) or pttl_ms <= 0:
            return  # gone meanwhile, or no expiry (not written by us): ignore
        if value == upstream.superseded_value or _replica(value) in (None, self.replica_id):
            return  # outdated by our own probe, our own entry, or not an entry at all
        state = breaker.state
        if state != "closed":
            upstream.known_value = value  # a later successful probe here outdates it
            return
        remaining_s = min(pttl_ms / 1000, breaker.config.reset_timeout_s)  # never longer than ours
        if breaker.open_for(remaining_s):
            upstream.known_value = value
            self.forced_opens += 1


@final
class _Opened:
    """A synthetic change for a breaker already open on its own when registered."""

    state = "open"
    forced = False


def _replica(value: bytes) -> str | None:
    if len(value) > MAX_VALUE_BYTES:
        return None
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    replica = doc.get("replica") if isinstance(doc, dict) else None
    return replica if isinstance(replica, str) else None
