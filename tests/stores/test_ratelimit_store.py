"""Rate-limit buckets: one contract suite run against memory and a real Redis (a private
redis-server for the module, a unique key prefix per test), then Redis faults against a
redis-server of the test's own: down at start, killed mid-run and back, paused with CLIENT
PAUSE. Redis runs in real time, so these use the wall clock with fast limits (intervals of tens
of milliseconds)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Literal

import pytest
import trio
import trio.testing

from resilient_ambassador.core.ratelimit import LEASE_TTL_S, Decision, Limit, descriptor_key
from resilient_ambassador.stores.ratelimit import Buckets, MemoryBuckets, RedisBuckets
from resilient_ambassador.stores.redis_client import RedisRunner, make_redis
from tests.stores.redis_server import RedisServer, redis_server
from tests.support.process import free_port

BUDGET_S = 0.2
SLACK_S = 0.15
FIVE_AT_ONCE = Limit(20, 1.0, 5)  # a token every 50 ms, five at once


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[str]:
    """One redis-server for the contract tests (a fresh machine may run none on 6379)."""
    with redis_server() as server:
        yield server.url


@pytest.fixture(params=["memory", "redis", "cluster"])
async def buckets(request: pytest.FixtureRequest) -> AsyncIterator[Buckets]:
    """Memory, one redis-server, and the session's 3-master Redis Cluster."""
    if request.param == "memory":
        yield MemoryBuckets()
        return
    if request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    else:
        url = request.getfixturevalue("shared_redis")
    runner = RedisRunner.from_url(url, timeout_s=0.5)
    try:
        yield RedisBuckets(runner, key_prefix=f"test:{secrets.token_hex(6)}:")
    finally:
        await runner.aclose()


def key() -> str:
    return descriptor_key("client_ip", "route", secrets.token_bytes(8))


async def take(buckets: Buckets, n: int, k: str, limit: Limit = FIVE_AT_ONCE) -> list[Decision]:
    return [await buckets.acquire(k, limit, 0.0) for _ in range(n)]


# -- the contract: memory and Redis alike ------------------------------------------------------


async def test_burst_then_refusal_with_retry_after(buckets: Buckets) -> None:
    decisions = await take(buckets, 6, key())
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    refused = decisions[5]
    assert 0 < refused.retry_after_s <= 0.05 + 1e-3
    assert 0.2 < refused.reset_s <= 0.25 + 1e-3


async def test_a_token_comes_back_after_the_interval(buckets: Buckets) -> None:
    k = key()
    await take(buckets, 5, k)
    await trio.sleep(0.06)
    assert [d.allowed for d in await take(buckets, 2, k)] == [True, False]


async def test_buckets_are_independent(buckets: Buckets) -> None:
    a, b = key(), key()
    await take(buckets, 5, a)
    assert (await take(buckets, 1, b))[0].allowed
    assert not (await take(buckets, 1, a))[0].allowed


async def test_queue_reserves_later_slots_up_to_max_wait(buckets: Buckets) -> None:
    k, limit = key(), Limit(20, 1.0, 1)
    decisions = [await buckets.acquire(k, limit, 0.12) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    waits = [d.wait_s for d in decisions[:3]]
    assert waits[0] == 0.0
    assert 0.03 < waits[1] <= 0.05 + 1e-3
    assert waits[1] < waits[2] <= 0.1 + 1e-3


async def test_concurrent_decisions_admit_exactly_the_burst(buckets: Buckets) -> None:
    """No read-modify-write race: 40 simultaneous callers, a burst of 5, a slow refill."""
    k, limit = key(), Limit(1, 60.0, 5)
    allowed: list[bool] = []

    async def one() -> None:
        allowed.append((await buckets.acquire(k, limit, 0.0)).allowed)

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(one)
    assert allowed.count(True) == 5


# -- Redis specifics ---------------------------------------------------------------------------


async def test_redis_key_is_prefix_plus_hash_with_a_ttl(shared_redis: str) -> None:
    runner = RedisRunner.from_url(shared_redis)
    prefix = f"test:{secrets.token_hex(6)}:"
    try:
        store = RedisBuckets(runner, key_prefix=prefix)
        hostile = descriptor_key("header", "r", b"*?[]\r\nKEYS *" + b"x" * 10_000)
        await store.acquire(hostile, FIVE_AT_ONCE, 0.0)
        keys = await runner.call(lambda c: c.keys(prefix + "*"))
        assert keys == [f"{prefix}rl:{{{hostile}}}".encode()]  # the hash is the Cluster hash tag
        ttl_ms = await runner.call(lambda c: c.pttl(keys[0]))
        assert 0 < ttl_ms <= 51  # full again after one interval
    finally:
        await runner.aclose()


async def test_concurrent_decisions_share_round_trips_and_cancelled_callers_block_nobody(
    shared_redis: str,
) -> None:
    runner = RedisRunner.from_url(shared_redis, timeout_s=0.5)
    try:
        store = RedisBuckets(runner, key_prefix=f"test:{secrets.token_hex(6)}:")
        limit = Limit(1e6, 1.0, 1_000_000)
        allowed: list[bool] = []

        async def one() -> None:
            allowed.append((await store.acquire(key(), limit, 0.0)).allowed)

        async def gives_up() -> None:
            with trio.move_on_after(0.0005):
                await store.acquire(key(), limit, 0.0)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(one)
                    if i % 8 == 1:
                        nursery.start_soon(gives_up)
        assert allowed == [True] * 40
        assert store.round_trips < 40  # batched: several decisions per pipeline
        assert store.fallbacks == 0
        assert store._queue == []
        assert not store._leading
    finally:
        await runner.aclose()


async def test_script_is_loaded_again_after_script_flush() -> None:
    with redis_server() as server:
        runner = RedisRunner.from_url(server.url)
        try:
            store = RedisBuckets(runner)
            assert (await store.acquire(key(), FIVE_AT_ONCE, 0.0)).allowed
            server.command("SCRIPT", "FLUSH")
            assert (await store.acquire(key(), FIVE_AT_ONCE, 0.0)).allowed  # NOSCRIPT -> load
            assert store.fallbacks == 0
        finally:
            await runner.aclose()


# -- Redis faults: a private redis-server ------------------------------------------------------


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


OnFailure = Literal["local", "allow", "deny"]
FaultStore = Callable[..., RedisBuckets]


@pytest.fixture
async def fault_store() -> AsyncIterator[FaultStore]:
    """Makes RedisBuckets with a short budget and cool-down; closes their runners after."""
    runners: list[RedisRunner] = []

    def make(url: str, on_failure: OnFailure = "local", share: float = 1.0) -> RedisBuckets:
        runner = RedisRunner(make_redis(url, timeout_s=BUDGET_S), budget_s=BUDGET_S, cooldown_s=0.3)
        runners.append(runner)
        return RedisBuckets(runner, on_failure=on_failure, local_share=share)

    try:
        yield make
    finally:
        for runner in runners:
            await runner.aclose()


@pytest.mark.parametrize(
    ("on_failure", "allowed"), [("local", [True, True, False]), ("allow", [True] * 3), ("deny", [False] * 3)]
)
async def test_redis_down_at_start_follows_on_backend_failure(
    fault_store: FaultStore, on_failure: OnFailure, allowed: list[bool]
) -> None:
    # local: this process's quarter of an 8-token burst is 2.
    store = fault_store(f"redis://127.0.0.1:{free_port()}/0", on_failure, share=0.25)
    limit = Limit(20, 1.0, 8)
    started = trio.current_time()
    decisions = [await store.acquire("k", limit, 0.0) for _ in range(3)]
    assert [d.allowed for d in decisions] == allowed
    assert store.fallbacks == 3
    assert trio.current_time() - started < 0.2  # refused connections, then the runner skips
    if on_failure == "deny":
        assert decisions[0].retry_after_s > 0


async def test_killed_mid_run_falls_back_then_recovers(server: RedisServer, fault_store: FaultStore) -> None:
    store = fault_store(server.url)
    limit = Limit(1, 60.0, 1000)  # a 60 s TTL per token: the key outlives the test
    assert (await store.acquire("k", limit, 0.0)).allowed
    server.kill()
    started = trio.current_time()
    for _ in range(20):
        assert (await store.acquire("k", limit, 0.0)).allowed  # local bucket, no 5xx, no raise
    assert trio.current_time() - started < 2 * BUDGET_S + SLACK_S
    assert store.fallbacks == 20
    server.start()
    with trio.fail_after(3):
        while True:
            before = store.fallbacks
            await store.acquire("k", limit, 0.0)
            if store.fallbacks == before:
                break  # answered by Redis again
            await trio.sleep(0.05)
    assert int(server.command("PTTL", "ra:rl:{k}")[1:]) > 0  # the bucket lives in Redis again


async def test_client_pause_costs_the_budget_then_fails_over(
    server: RedisServer, fault_store: FaultStore
) -> None:
    store = fault_store(server.url, "allow")
    assert (await store.acquire("k", FIVE_AT_ONCE, 0.0)).allowed
    server.command("CLIENT", "PAUSE", "1500", "WRITE")  # as during a failover
    try:
        started = trio.current_time()
        for _ in range(5):
            assert (await store.acquire("k", FIVE_AT_ONCE, 0.0)).allowed
        # Two budgets to trip the runner, then skipped at once.
        assert trio.current_time() - started < 2 * BUDGET_S + SLACK_S
        assert store.fallbacks == 5
    finally:
        server.command("CLIENT", "UNPAUSE")


# -- leases (reject mode, Redis only) ----------------------------------------------------------
# A MockClock that stands still times the leases here, so no held token expires; the limits
# refill one token per minutes of Redis time, so nothing comes back while a test runs either.

SLOW_AND_DEEP = Limit(1000, 3600.0, 1000)  # a token every 3.6 s, a thousand at once


@pytest.fixture(params=["redis", "cluster"])
def lease_url(request: pytest.FixtureRequest) -> str:
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return str(request.getfixturevalue("shared_redis"))


@pytest.mark.parametrize(("lease", "calls"), [(0, 200), (10, 20)])
async def test_a_lease_of_n_costs_one_redis_call_per_n_decisions(
    lease_url: str, lease: int, calls: int, mock_clock: trio.testing.MockClock
) -> None:
    runner = RedisRunner.from_url(lease_url, timeout_s=0.5)
    try:
        store = RedisBuckets(runner, key_prefix=f"test:{secrets.token_hex(6)}:", lease=lease)
        decisions = await take(store, 200, key(), SLOW_AND_DEEP)
        assert all(d.allowed for d in decisions)
        assert store.round_trips == calls
        assert runner.calls == calls  # every Redis call the limiter made
        assert store.script_runs == calls  # one at a time: no batching to share them
        assert store.leased == 200 - calls
        assert store.fallbacks == 0
    finally:
        await runner.aclose()


async def test_a_generous_limit_still_gets_its_lease_on_the_real_clock(lease_url: str) -> None:
    """A million a second: every leased token's slot falls due within microseconds, and an
    earlier rule (give a token up when its slot is due) made such leases worthless. Held
    for LEASE_TTL_S instead, ten decisions share each call however fast the limit refills."""
    runner = RedisRunner.from_url(lease_url, timeout_s=0.5)
    try:
        store = RedisBuckets(runner, key_prefix=f"test:{secrets.token_hex(6)}:", lease=10)
        with trio.fail_after(LEASE_TTL_S / 2):  # well inside one lease's lifetime
            decisions = await take(store, 100, key(), Limit(1_000_000, 1.0, 1_000_000))
        assert all(d.allowed for d in decisions)
        assert (store.script_runs, store.leased) == (10, 90)
    finally:
        await runner.aclose()


async def test_a_lease_is_granted_partially_at_the_end_of_the_burst(
    shared_redis: str, mock_clock: trio.testing.MockClock
) -> None:
    runner = RedisRunner.from_url(shared_redis, timeout_s=0.5)
    try:
        store = RedisBuckets(runner, key_prefix=f"test:{secrets.token_hex(6)}:", lease=4)
        decisions = await take(store, 8, key(), Limit(10, 3600.0, 6))  # 4 + 2 granted
        assert [d.allowed for d in decisions] == [True] * 6 + [False] * 2
        assert store.round_trips == 2 + 2  # two leases, then each refusal asks Redis again
        refused = decisions[-1]
        assert 359 < refused.retry_after_s <= 360.001  # one interval, as without a lease
    finally:
        await runner.aclose()


async def two_stores(url: str, lease: int) -> tuple[list[RedisRunner], list[RedisBuckets]]:
    """Two daemons' worth of runners and buckets, sharing one key prefix."""
    prefix = f"test:{secrets.token_hex(6)}:"
    runners = [RedisRunner.from_url(url, timeout_s=0.5) for _ in range(2)]
    return runners, [RedisBuckets(runner, key_prefix=prefix, lease=lease) for runner in runners]


async def test_two_leasing_processes_admit_no_more_than_the_burst_between_them(
    shared_redis: str, mock_clock: trio.testing.MockClock
) -> None:
    """Burst 20, lease 3, a token back every 6 minutes: any window of this test may admit
    limit + burst = 20 at most, and exactly that is admitted (held tokens are used, not lost)."""
    limit = Limit(10, 3600.0, 20)
    runners, (a, b) = await two_stores(shared_redis, 3)
    try:
        k = key()
        admitted = {"a": 0, "b": 0}
        for _ in range(30):  # strictly alternating: a, b, a, b, ...
            admitted["a"] += (await a.acquire(k, limit, 0.0)).allowed
            admitted["b"] += (await b.acquire(k, limit, 0.0)).allowed
        assert admitted == {"a": 11, "b": 9}  # leases of 3: a, b, a, b, a, b, then a gets 2
        assert a.leased + b.leased == 20 - 7  # seven leases granted, the rest used locally
    finally:
        for runner in runners:
            await runner.aclose()


async def test_concurrent_leasing_processes_never_admit_more_than_the_burst(
    lease_url: str, mock_clock: trio.testing.MockClock
) -> None:
    """60 simultaneous callers on each of two processes: every granted token is either used
    or still held, and together they are exactly the burst."""
    limit = Limit(10, 3600.0, 20)
    runners, stores = await two_stores(lease_url, 4)
    try:
        k = key()
        allowed: list[bool] = []

        async def one(store: RedisBuckets) -> None:
            allowed.append((await store.acquire(k, limit, 0.0)).allowed)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(60):
                    for store in stores:
                        nursery.start_soon(one, store)
        held = sum(store._held[k].usable(trio.current_time()) for store in stores if k in store._held)
        assert allowed.count(True) <= limit.burst
        assert allowed.count(True) + held == limit.burst
        assert all(not h.asks for store in stores for h in store._held.values())
        assert sum(store.round_trips for store in stores) < 120  # waiters share a lease
    finally:
        for runner in runners:
            await runner.aclose()
