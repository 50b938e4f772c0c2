"""One contract for every response store: the memory backend and the Redis backend (real
Redis on 127.0.0.1:6379 under a unique key prefix; its near-cache is turned off here so every
read goes to Redis) and the Redis backend on a 3-master Redis Cluster, in the manner of
pybreaker's storage mixin tests."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from resilient_ambassador.core.cache_rules import CachedEntry
from resilient_ambassador.stores.cache_memory import CacheStore, MemoryCacheStore
from resilient_ambassador.stores.cache_redis import RedisCacheStore, decode_entry, encode_entry
from resilient_ambassador.stores.redis_client import RedisRunner

SHARED_REDIS = "redis://127.0.0.1:6379/0"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make_entry(
    key: str, target: bytes = b"/a", *, url_key: str = "u1", body: bytes = b"hello", **kw: object
) -> CachedEntry:
    fields: dict[str, object] = {
        "key": key,
        "url_key": url_key,
        "target": target,
        "status": 200,
        "reason": b"OK",
        "headers": ((b"content-type", b"text/plain"), (b"etag", b'"1"'), (b"content-length", b"5")),
        "body": body,
        "response_time": 1_700_000_000.0,
        "initial_age_s": 0.0,
        "lifetime_s": 60.0,
        "swr_s": 0.0,
        "sie_s": 30.0,
        "no_stale": False,
        "credentials_ok": False,
        "vary": ((b"accept", b"x/y"), (b"x-none", None)),
    }
    fields.update(kw)
    return CachedEntry(**fields)  # type: ignore[arg-type]


StoreFactory = Callable[[Clock], CacheStore]


@pytest.fixture(params=["memory", "redis", "cluster"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Memory, the shared Redis, and the session's 3-master Redis Cluster."""
    runners: list[RedisRunner] = []
    prefix = f"test:{secrets.token_hex(6)}:"
    url = request.getfixturevalue("redis_cluster").url if request.param == "cluster" else SHARED_REDIS

    def factory(clock: Clock) -> CacheStore:
        if request.param == "memory":
            return MemoryCacheStore(1 << 20, clock=clock)
        runner = RedisRunner.from_url(url, timeout_s=1.0)
        runners.append(runner)
        return RedisCacheStore(
            runner, key_prefix=prefix, near_cache_bytes=1 << 20, near_ttl_s=0.0, clock=clock
        )

    yield factory
    for runner in runners:
        await runner.call(lambda c: [c.delete(k) for k in c.scan_iter(match=prefix + "*")])
        await runner.aclose()


async def test_put_then_get_round_trips(make_store: StoreFactory) -> None:
    store = make_store(Clock())
    entry = make_entry("k1", target=b"/a?q=%0d%0a* ?[]\xff")
    store.put(entry)
    await store.flush()
    assert await store.get("k1") == entry
    assert await store.get("other") is None


async def test_entries_outlive_freshness_by_the_stale_window_only(make_store: StoreFactory) -> None:
    clock = Clock()
    store = make_store(clock)
    store.put(make_entry("k1", lifetime_s=0.2, sie_s=0.2, headers=((b"content-type", b"text/plain"),)))
    await store.flush()
    clock.now += 0.3
    assert await store.get("k1") is not None  # stale, but kept for stale-if-error
    clock.now += 0.2
    if isinstance(store, RedisCacheStore):
        await trio.sleep(0.45)  # Redis expires on its own clock
    assert await store.get("k1") is None


async def test_invalidate_removes_every_variant_of_a_url(make_store: StoreFactory) -> None:
    store = make_store(Clock())
    store.put(make_entry("k1", url_key="u1"))
    store.put(make_entry("k2", url_key="u1"))
    store.put(make_entry("k3", url_key="u2"))
    store.invalidate("u1")
    await store.flush()
    assert [await store.get(k) is None for k in ("k1", "k2", "k3")] == [True, True, False]


async def test_purge_one_url_or_a_prefix(make_store: StoreFactory) -> None:
    store = make_store(Clock())
    store.put(make_entry("k1", b"/v1/a"))
    store.put(make_entry("k2", b"/v1/a?x=1", url_key="u2"))
    store.put(make_entry("k3", b"/v2/b", url_key="u3"))
    await store.flush()
    assert await store.purge(b"/v1/a", prefix=False) == 1
    assert await store.get("k1") is None
    assert await store.get("k2") is not None
    assert await store.purge(b"/v1/", prefix=True) == 1
    assert await store.get("k2") is None
    assert await store.get("k3") is not None


async def test_a_newer_entry_replaces_the_old_one(make_store: StoreFactory) -> None:
    store = make_store(Clock())
    store.put(make_entry("k1", body=b"old"))
    store.put(make_entry("k1", body=b"new"))
    await store.flush()
    got = await store.get("k1")
    assert got is not None
    assert got.body == b"new"


async def test_lease_is_exclusive_on_shared_stores(make_store: StoreFactory) -> None:
    store = make_store(Clock())
    first = await store.lease("k1", 1.0)
    second = await store.lease("k1", 1.0)
    assert first
    assert second is isinstance(store, MemoryCacheStore)  # memory: no other pod to wait for


def test_memory_store_is_lru_bounded_in_bytes() -> None:
    clock = Clock()
    one = make_entry("k0", body=b"x" * 1000).size_bytes
    store = MemoryCacheStore(3 * one, clock=clock)
    for i in range(3):
        store.put(make_entry(f"k{i}", body=b"x" * 1000))
    trio.run(store.get, "k0")  # touch k0: k1 is now the least recently used
    store.put(make_entry("k3", body=b"x" * 1000))
    assert store.stats.evictions == 1
    assert store.stats.bytes <= 3 * one
    assert trio.run(store.get, "k1") is None
    assert trio.run(store.get, "k0") is not None
    store.put(make_entry("big", body=b"x" * 10 * one))
    assert store.stats.too_large == 1


def test_codec_refuses_what_it_did_not_write() -> None:
    entry = make_entry("k1", body=b"\x00\n\xffbody")
    assert decode_entry(encode_entry(entry)) == entry
    assert decode_entry(b"garbage") is None
    assert decode_entry(b'{"v": 99}\nbody') is None
    assert decode_entry(b'{"v": 1}\nbody') is None
