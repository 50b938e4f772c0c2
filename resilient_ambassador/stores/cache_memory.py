"""The in-process response store: an LRU bounded in bytes. It is the `memory` backend and,
inside the Redis backend, the near-cache in front of Redis.

Stores are dumb on purpose: what may be stored and when it may be used is decided by
`core.cache_rules`; a store keeps an entry until its storage TTL (freshness plus the longest
stale window) runs out, evicting least recently used entries to stay within `max_bytes`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, final

import trio

from resilient_ambassador.core.cache_rules import CachedEntry


@final
@dataclass(slots=True)
class CacheStoreStats:
    """Counters for /stats; `bytes`/`entries` are what this process holds now."""

    entries: int = 0
    bytes: int = 0
    stores: int = 0
    evictions: int = 0
    too_large: int = 0  # entries bigger than the whole store: never kept
    redis_fallbacks: int = 0  # reads answered without Redis (down, slow or cooling down)
    dropped_writes: int = 0  # writes Redis refused or the write queue had no room for


class CacheStore(Protocol):
    """What the cache stage needs from a backend. Reads never raise: a store that cannot
    answer returns None (a miss) and counts it. Writes are fire-and-forget."""

    stats: CacheStoreStats

    async def get(self, key: str) -> CachedEntry | None: ...
    def put(self, entry: CachedEntry) -> None: ...
    def invalidate(self, url_key: str) -> None: ...
    async def purge(self, target: bytes, *, prefix: bool) -> int: ...
    async def lease(self, key: str, ttl_s: float) -> bool: ...
    def release_lease(self, key: str) -> None: ...
    async def flush(self) -> None: ...
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...


@final
@dataclass(slots=True)
class _Slot:
    entry: CachedEntry
    expires_at: float  # on the store's clock: dropped from then on
    serve_until: float  # near-cache: served without asking Redis until then


@final
class EntryLru:
    """Entries by key, least recently used first, within `max_bytes`; with an index from URL
    key to entry keys so invalidating a URL removes every variant."""

    def __init__(self, max_bytes: int, stats: CacheStoreStats) -> None:
        self.max_bytes = max_bytes
        self.stats = stats
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._by_url: dict[str, set[str]] = {}

    def get(self, key: str, now: float) -> _Slot | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        if now >= slot.expires_at:
            self.remove(key)
            return None
        self._slots.move_to_end(key)
        return slot

    def put(self, entry: CachedEntry, expires_at: float, serve_until: float) -> bool:
        size = entry.size_bytes
        if size > self.max_bytes:
            self.stats.too_large += 1
            return False
        self.remove(entry.key)
        self._slots[entry.key] = _Slot(entry, expires_at, serve_until)
        self._by_url.setdefault(entry.url_key, set()).add(entry.key)
        self.stats.entries += 1
        self.stats.bytes += size
        while self.stats.bytes > self.max_bytes:
            oldest = next(iter(self._slots))
            self.remove(oldest)
            self.stats.evictions += 1
        return True

    def remove(self, key: str) -> None:
        slot = self._drop(key)
        if slot is None:
            return
        keys = self._by_url.get(slot.entry.url_key)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_url[slot.entry.url_key]

    def _drop(self, key: str) -> _Slot | None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self.stats.entries -= 1
            self.stats.bytes -= slot.entry.size_bytes
        return slot

    def invalidate(self, url_key: str) -> int:
        keys = self._by_url.pop(url_key, set())
        for key in keys:
            self._drop(key)
        return len(keys)

    def purge(self, target: bytes, *, prefix: bool) -> int:
        doomed = [
            key
            for key, slot in self._slots.items()
            if (slot.entry.target.startswith(target) if prefix else slot.entry.target == target)
        ]
        for key in doomed:
            self.remove(key)
        return len(doomed)


@final
class MemoryCacheStore:
    """The `memory` backend: one process, nothing shared."""

    def __init__(self, max_bytes: int, *, clock: Callable[[], float] = time.time) -> None:
        self.stats = CacheStoreStats()
        self._lru = EntryLru(max_bytes, self.stats)
        self._clock = clock

    async def get(self, key: str) -> CachedEntry | None:
        slot = self._lru.get(key, self._clock())
        return None if slot is None else slot.entry

    def put(self, entry: CachedEntry) -> None:
        now = self._clock()
        if self._lru.put(entry, now + entry.storage_ttl_s(now), now):
            self.stats.stores += 1

    def invalidate(self, url_key: str) -> None:
        self._lru.invalidate(url_key)

    async def purge(self, target: bytes, *, prefix: bool) -> int:
        return self._lru.purge(target, prefix=prefix)

    async def lease(self, key: str, ttl_s: float) -> bool:
        return True  # one process: the stage's own coalescing is all there is

    def release_lease(self, key: str) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
