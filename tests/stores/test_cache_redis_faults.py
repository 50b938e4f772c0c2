"""The Redis response store when Redis misbehaves: a private redis-server per test that is
paused, killed or out of memory. Reads fall back within the budget, writes are dropped and
counted, nothing raises into a request."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import trio

from resilient_ambassador.stores.cache_redis import WRITE_QUEUE, RedisCacheStore
from resilient_ambassador.stores.redis_client import RedisRunner, make_redis
from tests.stores.redis_server import RedisServer, redis_server
from tests.stores.test_cache_store_contract import Clock, make_entry

BUDGET_S = 0.2
SLACK_S = 0.15


@pytest.fixture
async def server() -> AsyncIterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
async def runner(server: RedisServer) -> AsyncIterator[RedisRunner]:
    runner = RedisRunner(make_redis(server.url, timeout_s=BUDGET_S), budget_s=BUDGET_S, cooldown_s=0.3)
    yield runner
    await runner.aclose()


def make_store(runner: RedisRunner, clock: Clock, near_ttl_s: float = 0.0) -> RedisCacheStore:
    return RedisCacheStore(
        runner, key_prefix="t:", near_cache_bytes=1 << 20, near_ttl_s=near_ttl_s, clock=clock
    )


async def test_paused_redis_is_bypassed_within_the_budget(server: RedisServer, runner: RedisRunner) -> None:
    store = make_store(runner, Clock())
    server.command("CLIENT", "PAUSE", "3000", "ALL")
    started = time.monotonic()
    assert await store.get("missing") is None
    assert time.monotonic() - started < BUDGET_S + SLACK_S
    assert store.stats.redis_fallbacks == 1
    assert await store.lease("k", 1.0)  # cannot ask: this pod fetches itself


async def test_near_cache_copy_answers_while_redis_is_down(server: RedisServer, runner: RedisRunner) -> None:
    clock = Clock()
    store = make_store(runner, clock, near_ttl_s=1.0)
    entry = make_entry("k1", lifetime_s=1.0, sie_s=600.0)
    store.put(entry)
    await store.flush()
    server.kill()
    assert await store.get("k1") == entry  # fresh near-cache copy: Redis not asked
    clock.now += 5  # stale now: Redis is asked, fails, the stale near copy is still served
    assert await store.get("k1") == entry
    assert store.stats.redis_fallbacks == 1


async def test_out_of_memory_drops_writes_and_counts_them(server: RedisServer, runner: RedisRunner) -> None:
    server.command("CONFIG", "SET", "maxmemory", "1")
    server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    store = make_store(runner, Clock())
    store.put(make_entry("k1"))
    await store.flush()
    assert store.stats.dropped_writes == 1
    assert store.stats.stores == 0
    assert runner.healthy  # Redis answered: it is not down


async def test_a_released_lease_can_be_taken_again(runner: RedisRunner) -> None:
    store = make_store(runner, Clock())
    assert await store.lease("k1", 5.0)
    assert not await store.lease("k1", 5.0)
    store.release_lease("k1")
    await store.flush()
    assert await store.lease("k1", 5.0)


async def test_a_full_write_queue_drops_and_counts(runner: RedisRunner) -> None:
    store = make_store(runner, Clock())
    for i in range(WRITE_QUEUE + 5):
        store.put(make_entry(f"k{i}"))  # queued for run(); the caller never waits for Redis
    assert store.stats.dropped_writes == 5


async def test_a_lease_sent_to_a_frozen_redis_is_released_when_it_thaws(server: RedisServer) -> None:
    """SIGSTOP between the read and the lease: the SET NX is abandoned at the budget, and the
    thawed Redis runs it anyway. Without its release, every pod would wait a whole lease TTL
    (coalesce_wait_s) for a fetch nobody is making."""
    runner = RedisRunner(make_redis(server.url, timeout_s=BUDGET_S), budget_s=BUDGET_S, cooldown_s=0.3)
    store = make_store(runner, Clock())
    other = make_store(RedisRunner(make_redis(server.url, timeout_s=BUDGET_S), budget_s=BUDGET_S), Clock())
    assert await store.get("k1") is None  # a pooled connection, as in a busy daemon
    server.freeze()
    assert await store.lease("k1", 30.0)  # cannot ask: this pod fetches itself
    server.thaw()
    with trio.fail_after(5):
        while b":-2" in server.command("PTTL", "t:c:l:{k1}"):  # noqa: ASYNC110 (state in Redis)
            await trio.sleep(0.01)  # the thawed Redis ran the abandoned SET NX: a ghost lease
    assert not await other.lease("k1", 30.0)

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        started = time.monotonic()
        with trio.fail_after(5):
            while not await other.lease("k1", 30.0):  # noqa: ASYNC110 (state in Redis)
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    # Released at the first retry once Redis answers (cool-down 0.3 s, retry every 0.25 s).
    assert time.monotonic() - started < 1.0 + SLACK_S
    await runner.aclose()


async def test_a_lease_refused_for_memory_is_not_released_later(
    server: RedisServer, runner: RedisRunner
) -> None:
    """OOM: Redis answered and set nothing, so there is nothing to release (and no retry
    traffic against a Redis that is already struggling)."""
    server.command("CONFIG", "SET", "maxmemory", "1")
    server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    store = make_store(runner, Clock())
    assert await store.lease("k1", 5.0)  # refused: this pod fetches itself
    assert runner.healthy
    calls = runner.calls
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await trio.sleep(0.6)  # past two UNSURE_LEASE_RETRY_S: no release was attempted
        nursery.cancel_scope.cancel()
    assert runner.calls == calls
