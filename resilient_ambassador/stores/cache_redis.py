"""The `redis` response store: entries shared by every pod, an in-process near-cache in front.

Layout (every key is the configured prefix plus a hash; nothing a client sent is ever part of
a key, a pattern or script source):

- `<prefix>c:{<key>}`: one entry, `<JSON head>\\n<body>`, with a PX expiry covering freshness
  plus the longest stale window, so a stale copy is still there for stale-if-error.
- `<prefix>c:u:{<url_key>}`: a set of the entry keys of one URL (its variants), so an unsafe
  request invalidates all of them.
- `<prefix>c:idx`: a sorted set indexing entries for purges: member `<key> <target>`, score
  the entry's expiry in ms (pruned on every write), scanned with bounded ZSCAN by a purge.
- `<prefix>c:l:{<key>}`: a short lease (SET NX PX) so one pod fetches a missing entry while
  the others wait for it to appear (cross-pod request coalescing). A lease call that ran out
  of budget may still land later (a frozen Redis runs it when it thaws): `run()` releases such
  leases by compare-and-delete as soon as Redis answers, so they never stall other pods for a
  whole lease TTL.

The braces are Redis Cluster hash tags: an entry and its lease share a slot (one node answers
for one cache key), and entries spread over the masters by key. No command or script touches
two keys: the write, invalidate and purge pipelines send one-key commands, which redis-py
splits by node in a Cluster (none is a transaction: a write is best effort anyway).

Reads go through the near-cache first: a copy is served without asking Redis while it is
fresh and younger than `near_ttl_s`; after that Redis is asked, and when Redis cannot answer
(down, slow, cooling down) the near-cache copy, even stale, is what the stage gets, so
stale-if-error still works. Writes are queued and done by `run()` in the background: a client
never waits for Redis to store what it is already receiving.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any, final

import redis
import trio

from resilient_ambassador.core.cache_rules import CachedEntry
from resilient_ambassador.stores.cache_memory import CacheStoreStats, EntryLru
from resilient_ambassador.stores.errors import StoreUnavailable
from resilient_ambassador.stores.redis_client import LuaScript, RedisClient, RedisRunner

log = logging.getLogger("resilient_ambassador.cache")

# Queued writes beyond this are dropped (and counted): a slow Redis must not grow memory.
WRITE_QUEUE = 1000
# ZSCAN batch and overall bound for one purge; a purge past the bound reports what it did.
PURGE_SCAN_COUNT = 1000
PURGE_MAX_MEMBERS = 1_000_000
FORMAT_VERSION = 1
# A lease SET that ran out of budget may still run later: a frozen Redis (SIGSTOP, a VM pause)
# executes what it was sent when it thaws, and that lease would then hold every pod's request
# for its URL for a whole lease TTL. Such leases are released by compare-and-delete once Redis
# answers again, tried this often; at most this many are remembered (oldest forgotten first).
UNSURE_LEASE_RETRY_S = 0.25
MAX_UNSURE_LEASES = 1024

_Op = tuple[str, Any]

# Release a lease only if it is still ours (it may have expired and been taken by another pod).
_CAS_DELETE = LuaScript("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")


def encode_entry(entry: CachedEntry) -> bytes:
    """The stored form: a JSON head (header bytes as latin-1, lossless) and the raw body."""
    head = {
        "v": FORMAT_VERSION,
        "key": entry.key,
        "url": entry.url_key,
        "target": entry.target.decode("latin-1"),
        "status": entry.status,
        "reason": entry.reason.decode("latin-1"),
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in entry.headers],
        "response_time": entry.response_time,
        "initial_age_s": entry.initial_age_s,
        "lifetime_s": entry.lifetime_s,
        "swr_s": entry.swr_s,
        "sie_s": entry.sie_s,
        "no_stale": entry.no_stale,
        "credentials_ok": entry.credentials_ok,
        "vary": [[n.decode("latin-1"), None if v is None else v.decode("latin-1")] for n, v in entry.vary],
    }
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + entry.body


def decode_entry(raw: bytes) -> CachedEntry | None:
    """The entry, or None for anything not written by this version (never trusted blindly)."""
    head_raw, newline, body = raw.partition(b"\n")
    if not newline:
        return None
    try:
        head = json.loads(head_raw)
        if head.get("v") != FORMAT_VERSION:
            return None
        return CachedEntry(
            key=str(head["key"]),
            url_key=str(head["url"]),
            target=str(head["target"]).encode("latin-1"),
            status=int(head["status"]),
            reason=str(head["reason"]).encode("latin-1"),
            headers=tuple((str(n).encode("latin-1"), str(v).encode("latin-1")) for n, v in head["headers"]),
            body=body,
            response_time=float(head["response_time"]),
            initial_age_s=float(head["initial_age_s"]),
            lifetime_s=float(head["lifetime_s"]),
            swr_s=float(head["swr_s"]),
            sie_s=float(head["sie_s"]),
            no_stale=bool(head["no_stale"]),
            credentials_ok=bool(head["credentials_ok"]),
            vary=tuple(
                (str(n).encode("latin-1"), None if v is None else str(v).encode("latin-1"))
                for n, v in head["vary"]
            ),
        )
    except (ValueError, KeyError, TypeError, UnicodeError):
        return None


@final
class RedisCacheStore:
    """Entries in Redis through the shared `RedisRunner`, a near-cache in front."""

    def __init__(
        self,
        runner: RedisRunner,
        *,
        key_prefix: str,
        near_cache_bytes: int,
        near_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stats = CacheStoreStats()
        self._runner = runner
        self._prefix = key_prefix.encode() + b"c:"
        self._index = self._prefix + b"idx"
        self._near = EntryLru(near_cache_bytes, self.stats)
        self._near_ttl_s = near_ttl_s
        self._clock = clock
        self._send, self._receive = trio.open_memory_channel[_Op](WRITE_QUEUE)
        self._leases: dict[str, str] = {}  # key -> our token, while we hold its lease
        self._unsure: dict[str, bytes] = {}  # token -> lease key: a lease SET that may yet land
        self._unsure_retry_at = -math.inf  # on trio's clock
        self._applying = trio.Lock()  # one write at a time; flush() waits for the current one

    def _key(self, key: str) -> bytes:
        return self._prefix + b"{" + key.encode() + b"}"

    def _url_set(self, url_key: str) -> bytes:
        return self._prefix + b"u:{" + url_key.encode() + b"}"

    def _keep_near(self, entry: CachedEntry, now: float) -> None:
        ttl_s = entry.ttl_s(now)
        serve_until = now + min(self._near_ttl_s, max(0.0, ttl_s))
        self._near.put(entry, now + entry.storage_ttl_s(now), serve_until)

    async def get(self, key: str) -> CachedEntry | None:
        now = self._clock()
        near = self._near.get(key, now)
        if near is not None and now < near.serve_until:
            return near.entry
        try:
            raw = await self._runner.call(lambda client: client.get(self._key(key)))
        except StoreUnavailable:
            self.stats.redis_fallbacks += 1
            return None if near is None else near.entry
        entry = decode_entry(raw) if isinstance(raw, bytes) else None
        if entry is None or entry.key != key:
            self._near.remove(key)
            return None
        self._keep_near(entry, self._clock())
        return entry

    def put(self, entry: CachedEntry) -> None:
        self._keep_near(entry, self._clock())
        self._queue(("put", entry))

    def invalidate(self, url_key: str) -> None:
        self._near.invalidate(url_key)
        self._queue(("invalidate", url_key))

    def _queue(self, op: _Op) -> None:
        try:
            self._send.send_nowait(op)
        except trio.WouldBlock:
            self.stats.dropped_writes += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply queued writes, one at a time (each within the runner's budget), and release
        unsure leases every UNSURE_LEASE_RETRY_S until Redis answers."""
        task_status.started()
        while True:
            op: _Op | None = None
            with trio.move_on_after(UNSURE_LEASE_RETRY_S if self._unsure else math.inf):
                try:
                    op = await self._receive.receive()
                except trio.EndOfChannel:
                    return
            async with self._applying:
                if op is not None:
                    await self._apply(op)
                if self._unsure and trio.current_time() >= self._unsure_retry_at:
                    await self._release_unsure()

    async def flush(self) -> None:
        """Apply every queued write now (tests, and before a purge so it sees them)."""
        while True:
            try:
                op = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            async with self._applying:
                await self._apply(op)
        async with self._applying:
            pass  # a write run() had already taken is done too

    async def _apply(self, op: _Op) -> None:
        try:
            kind, arg = op
            if kind == "put":
                await self._write(arg)
            elif kind == "unlease":
                await self._unlease(*arg)
            else:
                await self._invalidate(arg)
        except StoreUnavailable as exc:
            self.stats.dropped_writes += 1
            log.debug("cache write dropped: %s", exc)

    async def _write(self, entry: CachedEntry) -> None:
        now = self._clock()
        ttl_ms = math.ceil(entry.storage_ttl_s(now) * 1000)
        if ttl_ms <= 0:
            return
        key = self._key(entry.key)
        url_set = self._url_set(entry.url_key)
        value = encode_entry(entry)
        member = entry.key.encode() + b" " + entry.target
        now_ms = int(now * 1000)

        def write(client: RedisClient) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.set(key, value, px=ttl_ms)
            pipe.sadd(url_set, entry.key)
            pipe.pexpire(url_set, ttl_ms, gt=True)
            pipe.pexpire(url_set, ttl_ms, nx=True)
            pipe.zadd(self._index, {member: now_ms + ttl_ms})
            pipe.zremrangebyscore(self._index, "-inf", now_ms)
            pipe.execute()

        await self._runner.call(write)
        self.stats.stores += 1

    async def _invalidate(self, url_key: str) -> None:
        url_set = self._url_set(url_key)

        def invalidate(client: RedisClient) -> None:
            members = client.smembers(url_set)
            pipe = client.pipeline(transaction=False)
            for member in members:
                pipe.delete(self._key(member.decode() if isinstance(member, bytes) else str(member)))
            pipe.delete(url_set)
            pipe.execute()

        await self._runner.call(invalidate)

    async def purge(self, target: bytes, *, prefix: bool) -> int:
        """Remove every entry whose target is `target` (or starts with it): here and in
        Redis. Raises StoreUnavailable when Redis cannot be purged (the caller reports it)."""
        await self.flush()
        removed = self._near.purge(target, prefix=prefix)

        def purge(client: RedisClient) -> int:
            doomed: list[bytes] = []
            members: list[bytes] = []
            for seen, (member, _) in enumerate(client.zscan_iter(self._index, count=PURGE_SCAN_COUNT)):
                if seen >= PURGE_MAX_MEMBERS:
                    break
                raw = bytes(member)
                key, _, entry_target = raw.partition(b" ")
                if entry_target.startswith(target) if prefix else entry_target == target:
                    doomed.append(self._key(key.decode("latin-1")))
                    members.append(raw)
            count = 0
            for start in range(0, len(doomed), PURGE_SCAN_COUNT):
                # One DEL per key: a Cluster pipeline cannot send a DEL of keys in many slots.
                pipe = client.pipeline(transaction=False)
                for doomed_key in doomed[start : start + PURGE_SCAN_COUNT]:
                    pipe.delete(doomed_key)
                pipe.zrem(self._index, *members[start : start + PURGE_SCAN_COUNT])
                count += sum(int(n) for n in pipe.execute()[:-1])
            return count

        # A purge may scan a large index: a longer budget than a request's read.
        found = await self._runner.call(purge, budget_s=max(self._runner.budget_s, 5.0))
        return max(found, removed)

    async def lease(self, key: str, ttl_s: float) -> bool:
        """True when this pod should fetch `key` (it got the lease, or Redis cannot say)."""
        lease_key = self._lease_key(key)
        token = secrets.token_hex(8)
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        try:
            got = await self._runner.call(lambda client: client.set(lease_key, token, nx=True, px=ttl_ms))
        except StoreUnavailable as exc:
            self.stats.redis_fallbacks += 1
            # Refused (OOM, say) means Redis answered and set nothing; anything else may land.
            if not isinstance(exc.__cause__, redis.ResponseError):
                if len(self._unsure) >= MAX_UNSURE_LEASES:
                    del self._unsure[next(iter(self._unsure))]
                self._unsure[token] = lease_key
            return True
        if got:
            self._leases[key] = token
        return bool(got)

    def release_lease(self, key: str) -> None:
        """Give the lease back once our fetch is done (stored or not), so other pods stop
        waiting for an entry that is not coming."""
        token = self._leases.pop(key, None)
        if token is not None:
            self._queue(("unlease", (key, token)))

    def _lease_key(self, key: str) -> bytes:
        return self._prefix + b"l:{" + key.encode() + b"}"

    async def _release_unsure(self) -> None:
        """Compare-and-delete every unsure lease (only ever our own token); kept on failure."""
        self._unsure_retry_at = trio.current_time() + UNSURE_LEASE_RETRY_S
        pairs = list(self._unsure.items())

        def release(client: RedisClient) -> None:
            _CAS_DELETE.run_batch(client, [([lease_key], [token]) for token, lease_key in pairs])

        try:
            await self._runner.call(release)
        except StoreUnavailable:
            return
        for token, _ in pairs:
            self._unsure.pop(token, None)

    async def _unlease(self, key: str, token: str) -> None:
        lease_key = self._lease_key(key)
        await self._runner.call(lambda client: _CAS_DELETE(client, [lease_key], [token]))
