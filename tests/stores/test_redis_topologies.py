"""The Redis-backed stores on every topology, against real servers (tests/stores/
redis_topologies.py): a 3-master Redis Cluster (hash tags, pipelines split by node, NOSCRIPT per
node, a master killed and back), a Sentinel-managed master (a failover promotes the replica),
and rediss:// with a CA and a client certificate. Redis runs in real time, so these use the
wall clock, and every wait polls for a condition under a deadline."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from resilient_ambassador.core.config import RateLimitConfig, RedisConfig, RouteConfig, TLSConfig
from resilient_ambassador.core.ratelimit import Limit, descriptor_key
from resilient_ambassador.stores.cache_redis import RedisCacheStore
from resilient_ambassador.stores.errors import StoreUnavailable
from resilient_ambassador.stores.ratelimit import RedisBuckets
from resilient_ambassador.stores.redis_client import RedisRunner, connector
from resilient_ambassador.stores.shared_quota import SharedQuotaSync
from tests.stages.test_breaker_shared import replicas
from tests.stages.test_breaker_shared import wait_for as wait_until
from tests.stages.test_breaker_stage import expect_open, trip
from tests.stores.redis_topologies import RedisClusterNodes, RedisSentinelSetup, TlsRedis, temp_directory
from tests.stores.test_cache_store_contract import Clock, make_entry
from tests.support.client import http_request
from tests.support.daemon import simple_config, start_daemon, upstream_config
from tests.support.process import free_port
from tests.support.upstream import start_fake_upstream

BUDGET_S = 0.2
COOLDOWN_S = 0.2
# A call answers within its budget plus scheduling noise on a busy 2-core machine.
SLACK_S = 0.3
# Never refuses: these tests count who decided, not what. The key lives a minute, so a test
# can look for it on the server that decided.
ROOMY = Limit(1, 60.0, 1_000_000)


def key() -> str:
    return descriptor_key("client_ip", "route", secrets.token_bytes(8))


@pytest.fixture
def prefix() -> str:
    return f"test:{secrets.token_hex(6)}:"


Runners = Callable[..., Awaitable[RedisRunner]]


@pytest.fixture
async def runners() -> AsyncIterator[Runners]:
    """Runners with a short budget, connected the way the app does at start (in the
    background, outside any call's budget) when Redis answers."""
    made: list[RedisRunner] = []

    async def make(url: str, tls: TLSConfig | None = None, *, connect: bool = True) -> RedisRunner:
        runner = RedisRunner(
            connector(url, timeout_s=BUDGET_S, tls=tls), budget_s=BUDGET_S, cooldown_s=COOLDOWN_S
        )
        made.append(runner)
        if connect:
            await runner.connect()
        return runner

    yield make
    for runner in made:
        await runner.aclose()


async def decide_many(buckets: RedisBuckets, keys: list[str]) -> list[bool]:
    allowed: list[bool] = []

    async def one(k: str) -> None:
        allowed.append((await buckets.acquire(k, ROOMY, 0.0)).allowed)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for k in keys:
                nursery.start_soon(one, k)
    return allowed


async def decided_by_redis(buckets: RedisBuckets, k: str) -> bool:
    """One decision on `k`, within the budget; True when Redis made it."""
    before = buckets.fallbacks
    started = trio.current_time()
    await buckets.acquire(k, ROOMY, 0.0)
    assert trio.current_time() - started < BUDGET_S + SLACK_S
    return buckets.fallbacks == before


async def poll(condition: Callable[[], Any], what: str, timeout_s: float) -> None:
    """Await `condition()` (sync or async) until true, under a deadline."""
    with trio.move_on_after(timeout_s):
        while True:
            outcome = condition()
            if hasattr(outcome, "__await__"):
                outcome = await outcome
            if outcome:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


# -- Redis Cluster ---------------------------------------------------------------------------


async def test_cluster_keys_of_one_cache_key_share_a_slot_and_entries_spread(
    redis_cluster: RedisClusterNodes, runners: Runners, prefix: str
) -> None:
    runner = await runners(redis_cluster.url)
    store = RedisCacheStore(
        runner, key_prefix=prefix, near_cache_bytes=1 << 20, near_ttl_s=0.0, clock=Clock()
    )
    keys = [f"{i:032x}" for i in range(24)]
    for k in keys:
        store.put(make_entry(k, url_key="u1"))
        assert await store.lease(k, 5.0)
    await store.flush()
    assert store.stats.dropped_writes == 0
    nodes = set()
    for k in keys:
        entry_key, lease_key = f"{prefix}c:{{{k}}}", f"{prefix}c:l:{{{k}}}"
        node = redis_cluster.node_for(entry_key)
        assert redis_cluster.node_for(lease_key) == node  # one node answers for one cache key
        assert redis_cluster.nodes[node].command("EXISTS", entry_key, lease_key) == b":2\r\n"
        nodes.add(node)
    assert nodes == {0, 1, 2}  # 24 keys on one or two of three masters: odds below 1e-4
    # The URL's variants live on every master; an invalidation reaches them all.
    store.invalidate("u1")
    await store.flush()
    assert [await store.get(k) for k in keys] == [None] * len(keys)


async def test_cluster_batches_decisions_across_masters_and_reloads_scripts_per_node(
    redis_cluster: RedisClusterNodes, runners: Runners, prefix: str
) -> None:
    buckets = RedisBuckets(await runners(redis_cluster.url), key_prefix=prefix)
    assert await decide_many(buckets, [key() for _ in range(40)]) == [True] * 40
    first_trips = buckets.round_trips
    assert first_trips < 40  # several decisions per pipeline, although they span three masters
    for node in redis_cluster.nodes:
        assert node.command("SCRIPT", "FLUSH") == b"+OK\r\n"
    # NOSCRIPT from every master: the affected decisions go again with EVAL, not SCRIPT LOAD.
    assert await decide_many(buckets, [key() for _ in range(40)]) == [True] * 40
    assert buckets.fallbacks == 0
    sha = buckets._script.sha
    for node in redis_cluster.nodes:
        assert node.command("SCRIPT", "EXISTS", sha) == b"*1\r\n:1\r\n"  # EVAL cached it there


async def test_cluster_shares_open_breakers(redis_cluster: RedisClusterNodes, prefix: str) -> None:
    async with replicas(redis_cluster.url, prefix) as (a, b):
        assert await a.runner.connect()
        assert await b.runner.connect()
        await trip(a.stage, a.upstream)
        await wait_until(lambda: b.stage.state == "open", timeout_s=3.0)
        await expect_open(b.stage)
        assert b.upstream.calls == 0
        assert a.sync.published == 1
        assert b.sync.forced_opens == 1


class Tracker:
    """The part of a quota tracker the sync uses, recording what peers told it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.on_pause: Callable[[float], None] | None = None
        self.paused_s: list[float] = []

    def pause_from_peer(self, pause_s: float) -> bool:
        self.paused_s.append(pause_s)
        return True


async def test_cluster_shares_quota_pauses(
    redis_cluster: RedisClusterNodes, prefix: str, runners: Runners
) -> None:
    syncs = [
        SharedQuotaSync(await runners(redis_cluster.url), key_prefix=prefix, interval_s=0.05)
        for _ in range(2)
    ]
    trackers = [Tracker(f"upstream-{i}") for i in range(6)]  # keys on every master
    peers = [Tracker(t.upstream) for t in trackers]
    for tracker, peer in zip(trackers, peers, strict=True):
        syncs[0].register(tracker)
        syncs[1].register(peer)
    async with trio.open_nursery() as nursery:
        for sync in syncs:
            await nursery.start(sync.run)
        for tracker in trackers:
            assert tracker.on_pause is not None
            tracker.on_pause(30.0)
        await poll(lambda: all(p.paused_s for p in peers), "every peer to see its pause", 3.0)
        nursery.cancel_scope.cancel()
    assert all(25.0 < p.paused_s[-1] <= 30.0 for p in peers)
    assert syncs[0].published == 6
    assert syncs[0].sync_errors == syncs[1].sync_errors == 0


async def test_cluster_down_at_start_falls_back_within_the_budget(
    runners: Runners,
) -> None:
    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    runner = await runners(url, connect=False)  # no I/O: the Cluster client is made by a call
    assert runner.client is None
    assert not await runner.connect()  # what the app does at start: logged, not raised
    buckets = RedisBuckets(runner, local_share=0.5)
    limit = Limit(20, 1.0, 4)
    started = trio.current_time()
    decisions = [await buckets.acquire("k", limit, 0.0) for _ in range(3)]
    assert trio.current_time() - started < BUDGET_S + SLACK_S
    assert [d.allowed for d in decisions] == [True, True, False]  # half the burst, locally
    assert buckets.fallbacks == 3
    with pytest.raises(StoreUnavailable):
        await runner.call(lambda client: client.ping())


async def test_cluster_master_killed_falls_back_within_the_budget_then_recovers(
    redis_cluster: RedisClusterNodes, runners: Runners, prefix: str
) -> None:
    runner = await runners(redis_cluster.url)
    buckets = RedisBuckets(runner, key_prefix=prefix)
    keys = [key() for _ in range(30)]
    assert await decide_many(buckets, keys) == [True] * 30
    by_node = {i: [k for k in keys if redis_cluster.node_for(f"{prefix}rl:{{{k}}}") == i] for i in range(3)}
    doomed, alive = by_node[0][0], by_node[1][0]
    redis_cluster.kill(0)
    try:
        # Every call answers within the budget whatever Redis does; the doomed slot falls back.
        for _ in range(5):
            assert not await decided_by_redis(buckets, doomed)
            # The other masters keep deciding their keys: one batch, one pipeline per master.
            assert await decide_many(buckets, [alive, doomed]) == [True, True]
            assert await decided_by_redis(buckets, alive)
    finally:
        redis_cluster.restart(0)
    await poll(lambda: decided_by_redis(buckets, doomed), "the restarted master to decide again", 5.0)
    assert runner.healthy
    assert redis_cluster.nodes[0].command("EXISTS", f"{prefix}rl:{{{doomed}}}") == b":1\r\n"


async def test_cluster_failover_promotes_the_replica_and_decisions_follow_it(
    runners: Runners, prefix: str
) -> None:
    with temp_directory() as directory:
        cluster = RedisClusterNodes(directory, with_replica=True)
        try:
            cluster.start()
            runner = await runners(cluster.url)
            buckets = RedisBuckets(runner, key_prefix=prefix)
            keys = [key() for _ in range(30)]
            assert await decide_many(buckets, keys) == [True] * 30
            doomed = next(k for k in keys if cluster.node_for(f"{prefix}rl:{{{k}}}") == 0)
            cluster.kill(0)
            # Within the budget meanwhile (local decisions); then the replica is elected
            # (cluster-node-timeout 1 s + election), the client re-reads the slot map, and the
            # promoted replica decides, with the bucket it replicated.
            await poll(lambda: decided_by_redis(buckets, doomed), "decisions by the promoted replica", 15.0)
            assert cluster.node_for(f"{prefix}rl:{{{doomed}}}") == 3
            assert cluster.nodes[3].command("EXISTS", f"{prefix}rl:{{{doomed}}}") == b":1\r\n"
        finally:
            cluster.stop()


# -- Sentinel --------------------------------------------------------------------------------


async def test_sentinel_master_serves_limits_and_the_cache(
    redis_sentinel: RedisSentinelSetup, runners: Runners, prefix: str
) -> None:
    runner = await runners(redis_sentinel.url)
    buckets = RedisBuckets(runner, key_prefix=prefix)
    k = key()
    decisions = [await buckets.acquire(k, Limit(20, 1.0, 3), 0.0) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    store = RedisCacheStore(
        runner, key_prefix=prefix, near_cache_bytes=1 << 20, near_ttl_s=0.0, clock=Clock()
    )
    store.put(make_entry("k1"))
    await store.flush()
    assert await store.get("k1") == make_entry("k1")
    assert buckets.fallbacks == store.stats.redis_fallbacks == 0
    assert redis_sentinel.master().command("EXISTS", f"{prefix}rl:{{{k}}}") == b":1\r\n"


async def test_sentinel_failover_falls_back_within_the_budget_then_uses_the_new_master(
    redis_sentinel: RedisSentinelSetup, runners: Runners, prefix: str
) -> None:
    runner = await runners(redis_sentinel.url)
    buckets = RedisBuckets(runner, key_prefix=prefix)
    assert await decided_by_redis(buckets, key())
    old, replica = redis_sentinel.master(), redis_sentinel.replica()
    old.kill()
    try:
        # Every decision meanwhile answers within the budget, from the local fallback; then the
        # Sentinel promotes the replica and new connections find it.
        await poll(lambda: decided_by_redis(buckets, key()), "decisions by the promoted replica", 15.0)
        assert redis_sentinel.master_port() == replica.port
        k = key()
        assert await decided_by_redis(buckets, k)
        assert replica.command("EXISTS", f"{prefix}rl:{{{k}}}") == b":1\r\n"
    finally:
        # Back as a replica of whoever is master now (the Sentinel would convert it too, but
        # only after its next INFO round, up to 10 s later).
        old.args = ("--replicaof", "127.0.0.1", str(redis_sentinel.master_port()))
        old.start()
        redis_sentinel.wait_ready()


# -- TLS -------------------------------------------------------------------------------------


def tls_config(tls_redis: TlsRedis, **kw: Any) -> TLSConfig:
    m = tls_redis.material
    fields: dict[str, Any] = {
        "ca_file": str(m.ca_file),
        "cert_file": str(m.client_cert_file),
        "key_file": str(m.client_key_file),
    }
    fields.update(kw)
    return TLSConfig(**fields)


async def test_rediss_with_a_ca_and_a_client_certificate(
    tls_redis: TlsRedis, runners: Runners, prefix: str
) -> None:
    for host in ("127.0.0.1", "localhost"):  # the certificate names both; the name is checked
        buckets = RedisBuckets(
            await runners(tls_redis.url(host), tls=tls_config(tls_redis)), key_prefix=prefix
        )
        assert await decided_by_redis(buckets, key())


async def test_rediss_refuses_an_untrusted_server_and_a_missing_client_certificate(
    tls_redis: TlsRedis, runners: Runners, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    for tls in (
        tls_config(tls_redis, ca_file=str(other_ca)),  # not the CA that issued the server's cert
        tls_config(tls_redis, cert_file=None, key_file=None),  # the server requires one
    ):
        runner = await runners(tls_redis.url(), tls=tls)
        with pytest.raises(StoreUnavailable):
            await runner.call(lambda client: client.ping())
        assert runner.failures == 1  # a failed handshake counts against availability


async def test_a_daemon_shares_its_limit_through_rediss(nursery: trio.Nursery, tls_redis: TlsRedis) -> None:
    """The config's redis.tls reaches the daemon's client (app.py): two daemons, one limit."""
    upstream = await start_fake_upstream(nursery)
    redis = RedisConfig(
        url=tls_redis.url(), key_prefix=f"test:{secrets.token_hex(6)}:", tls=tls_config(tls_redis)
    )
    limit = RateLimitConfig(count=3, period_s=60.0, burst=3, backend="redis")
    config = dataclasses.replace(
        simple_config(
            upstream_config(upstream.url()), routes=[RouteConfig(upstream="up", name="api", rate_limit=limit)]
        ),
        redis=redis,
    )
    daemons = [await start_daemon(nursery, config) for _ in range(2)]
    statuses = [(await http_request(daemons[i % 2].port, "GET", "/")).status for i in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert all(d.app.redis is not None and d.app.redis.failures == 0 for d in daemons)
