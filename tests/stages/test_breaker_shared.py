"""Shared circuit breakers: BreakerStage's sharing hooks (MockClock, no Redis), then two or
three "replicas" (a BreakerStage + SharedBreakerSync each) against a real, private
redis-server, on the wall clock since Redis runs in real time."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from resilient_ambassador.core.config import BreakerConfig
from resilient_ambassador.core.errors import BreakerOpen
from resilient_ambassador.stages.breaker import BreakerChange, BreakerStage
from resilient_ambassador.stores.redis_client import RedisRunner, connector
from resilient_ambassador.stores.shared_breaker import SharedBreakerSync
from tests.stages.test_breaker_stage import REQUEST, ScriptedUpstream, Step, expect_open, make, trip
from tests.stores.redis_server import RedisServer, redis_server
from tests.support.process import free_port

SYNC_INTERVAL_S = 0.05
BUDGET_S = 0.1
# "Another replica refuses within ~1 s" in production (0.5 s interval + budget); here the
# interval is 0.05 s, so a generous bound still proves the propagation.
PROPAGATION_S = 1.0


# -- BreakerStage hooks: open_for and change hooks --------------------------------------------


def recorder(stage: BreakerStage) -> list[BreakerChange]:
    changes: list[BreakerChange] = []
    stage.add_change_hook(changes.append)
    return changes


async def test_open_for_opens_a_closed_breaker_for_that_long_then_probes_as_usual(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream, half_open_max_probes=1)
    changes = recorder(stage)
    assert stage.open_for(5.0)
    assert stage.state == "open"
    assert stage.time_until_half_open() == pytest.approx(5.0)
    error = await expect_open(stage)
    assert error.retry_after_s == pytest.approx(5.0)
    assert upstream.calls == 0
    assert changes == [BreakerChange("billing", "open", forced=True, open_for_s=5.0)]

    await trio.sleep(5.0)
    upstream.then(Step(200, delay_s=1.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage, REQUEST)  # the one probe
        await trio.sleep(0.1)
        await expect_open(stage)  # the rest fail fast while it is in flight
    assert stage.state == "closed"
    assert [c.state for c in changes] == ["open", "half-open", "closed"]
    assert not any(c.forced for c in changes[1:])
    assert stage.stats().opened == 1


async def test_a_failed_probe_after_a_forced_open_opens_it_locally_for_the_full_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream)
    changes = recorder(stage)
    stage.open_for(2.0)
    await trio.sleep(2.0)
    upstream.then(503)
    assert (await stage(REQUEST)).status == 503
    assert stage.state == "open"
    assert changes[-1] == BreakerChange(
        "billing", "open", forced=False, open_for_s=stage.config.reset_timeout_s
    )
    assert stage.time_until_half_open() == pytest.approx(stage.config.reset_timeout_s)


async def test_open_for_leaves_open_and_half_open_breakers_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream, reset_timeout_s=10.0)
    await trip(stage, upstream)
    assert not stage.open_for(100.0)
    assert stage.time_until_half_open() == pytest.approx(10.0)
    await trio.sleep(10.0)
    upstream.then(Step(200, delay_s=1.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage, REQUEST)
        await trio.sleep(0.1)
        assert stage.state == "half-open"
        assert not stage.open_for(100.0)  # the probe decides
    assert stage.state == "closed"
    assert not stage.open_for(0.0)
    assert stage.state == "closed"


async def test_a_local_trip_reaches_hooks_as_not_forced(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream)
    changes = recorder(stage)
    await trip(stage, upstream)
    assert changes == [
        BreakerChange("billing", "open", forced=False, open_for_s=stage.config.reset_timeout_s)
    ]


async def test_a_failing_hook_is_logged_and_never_reaches_the_request(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream)

    def broken(change: BreakerChange) -> None:
        raise RuntimeError("boom")

    stage.add_change_hook(broken)
    await trip(stage, upstream)  # the third 503 still comes back as a response
    assert stage.state == "open"
    assert any("change hook failed" in r.getMessage() for r in caplog.records)


async def test_a_call_admitted_before_a_forced_open_is_not_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ScriptedUpstream(Step(200, delay_s=1.0))
    stage = make(upstream, reset_timeout_s=10.0, success_threshold=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage, REQUEST)
        await trio.sleep(0.1)
        stage.open_for(5.0)
    assert stage.state == "open"  # the late success did not close it
    assert stage.time_until_half_open() == pytest.approx(5.0 - 0.9)


async def test_forced_open_is_logged_as_another_replicas_verdict(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_ambassador.breaker")
    stage = make(ScriptedUpstream())
    stage.open_for(2.5)
    assert any("another replica" in r.getMessage() and "2.5s" in r.getMessage() for r in caplog.records)


# -- replicas against a real Redis ----------------------------------------------------------


@dataclass
class Replica:
    stage: BreakerStage
    upstream: ScriptedUpstream
    sync: SharedBreakerSync
    runner: RedisRunner


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"test:{secrets.token_hex(6)}:"


@contextlib.asynccontextmanager
async def replicas(url: str, prefix: str, n: int = 2, **breaker: Any) -> AsyncIterator[list[Replica]]:
    settings: dict[str, Any] = {"failure_threshold": 3, "reset_timeout_s": 30.0, "min_requests": 0}
    settings.update(breaker)
    config = BreakerConfig(shared="redis", sync_interval_s=SYNC_INTERVAL_S, **settings)
    made: list[Replica] = []
    try:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                runner = RedisRunner(connector(url, timeout_s=BUDGET_S), budget_s=BUDGET_S, cooldown_s=0.2)
                upstream = ScriptedUpstream()
                stage = BreakerStage(upstream, config, name="billing")
                sync = SharedBreakerSync(runner, key_prefix=prefix, replica_id=f"replica-{i}")
                sync.register(stage)
                made.append(Replica(stage, upstream, sync, runner))
                await nursery.start(sync.run)
            yield made
            nursery.cancel_scope.cancel()
    finally:
        for replica in made:
            await replica.runner.aclose()


async def wait_for(predicate: Any, timeout_s: float = PROPAGATION_S) -> float:
    """Seconds until predicate() holds (fails after timeout_s)."""
    started = trio.current_time()
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polls state that other tasks own
            await trio.sleep(0.01)
    return trio.current_time() - started


async def test_an_open_breaker_on_one_replica_makes_the_other_refuse_within_the_bound(
    server: RedisServer, prefix: str
) -> None:
    async with replicas(server.url, prefix) as (a, b):
        await trip(a.stage, a.upstream)
        took_s = await wait_for(lambda: b.stage.state == "open")
        assert took_s < 3 * SYNC_INTERVAL_S + 2 * BUDGET_S
        error = await expect_open(b.stage)
        assert b.upstream.calls == 0
        assert error.retry_after_s is not None
        assert 29.0 < error.retry_after_s <= 30.0  # the TTL, from Redis's clock
        assert b.sync.forced_opens == 1
        assert a.sync.published == 1

        # The entry: hash-tagged key, the TTL is the open period, a small JSON value.
        key = a.sync.key("billing")
        assert key.startswith(prefix + "breaker:{")
        assert key.endswith("}")
        assert "billing" not in key
        pttl = int(server.command("PTTL", key).split(b"\r\n")[0][1:])
        assert 29_000 < pttl <= 30_000
        doc = json.loads(server.command("GET", key).split(b"\r\n")[1])
        assert doc["replica"] == "replica-0"
        assert doc["open_for_s"] == pytest.approx(30.0, abs=1.0)


async def test_a_successful_probe_closes_only_that_replica(server: RedisServer, prefix: str) -> None:
    async with replicas(server.url, prefix, n=3, reset_timeout_s=0.4) as (a, b, c):
        await trip(a.stage, a.upstream)
        await wait_for(lambda: b.stage.state == "open" and c.stage.state == "open")
        await trio.sleep(a.stage.time_until_half_open())
        assert (await a.stage(REQUEST)).status == 200  # A's probe closes A...
        assert a.stage.state == "closed"
        # ...B and C stay open until their own probes (closing is per replica).
        assert b.stage.state == "open"
        assert c.stage.state == "open"
        await trio.sleep(max(b.stage.time_until_half_open(), c.stage.time_until_half_open()))
        assert (await b.stage(REQUEST)).status == 200
        assert (await c.stage(REQUEST)).status == 200
        await trio.sleep(4 * SYNC_INTERVAL_S)
        assert [r.stage.state for r in (a, b, c)] == ["closed"] * 3  # nothing re-opened them
        assert a.sync.forced_opens == 0
        assert [b.upstream.calls, c.upstream.calls] == [1, 1]  # one probe per replica


async def test_an_entry_with_our_own_replica_id_never_opens_us(server: RedisServer, prefix: str) -> None:
    async with replicas(server.url, prefix, n=1) as (a,):
        own = json.dumps({"v": 1, "replica": a.sync.replica_id, "token": "o"})
        server.command("SET", a.sync.key("billing"), own, "PX", "5000")
        await trio.sleep(4 * SYNC_INTERVAL_S)
        assert a.stage.state == "closed"
        assert a.sync.forced_opens == 0


async def test_a_successful_probe_deletes_the_entry_it_outdated(server: RedisServer, prefix: str) -> None:
    async with replicas(server.url, prefix, n=1, reset_timeout_s=0.3) as (a,):
        await trip(a.stage, a.upstream)
        await wait_for(lambda: a.sync.published == 1)
        # Another replica opened later (its entry outlives A's open period); A sees it while open.
        key = a.sync.key("billing")
        later = json.dumps({"v": 1, "replica": "elsewhere", "token": "t"})
        server.command("SET", key, later, "PX", "5000")
        await trio.sleep(3 * SYNC_INTERVAL_S)
        await trio.sleep(a.stage.time_until_half_open())
        assert (await a.stage(REQUEST)).status == 200  # a newer verdict than that entry
        await wait_for(lambda: a.sync.cleared == 1)
        assert server.command("EXISTS", key) == b":0\r\n"
        assert a.stage.state == "closed"
    async with replicas(server.url, prefix, n=1) as (late,):  # a new replica starts closed
        await trio.sleep(4 * SYNC_INTERVAL_S)
        assert late.stage.state == "closed"


async def test_clearing_never_deletes_an_entry_it_did_not_see(server: RedisServer, prefix: str) -> None:
    async with replicas(server.url, prefix, n=1, reset_timeout_s=0.3) as (a,):
        await trip(a.stage, a.upstream)
        await wait_for(lambda: a.sync.published == 1)
        await trio.sleep(a.stage.time_until_half_open())
        key = a.sync.key("billing")
        newer = json.dumps({"v": 1, "replica": "elsewhere", "token": "n"})
        server.command("SET", key, newer, "PX", "5000")  # lands just before A closes
        assert (await a.stage(REQUEST)).status == 200
        await trio.sleep(3 * SYNC_INTERVAL_S)
        assert server.command("EXISTS", key) == b":1\r\n"
        assert a.sync.cleared == 0
        assert a.stage.state == "open"  # newer evidence than A's probe: A follows it
        assert a.sync.forced_opens == 1


async def test_remote_open_periods_are_capped_at_the_local_reset_timeout(
    server: RedisServer, prefix: str
) -> None:
    async with replicas(server.url, prefix, n=1, reset_timeout_s=2.0) as (a,):
        value = json.dumps({"v": 1, "replica": "elsewhere", "token": "x"})
        server.command("SET", a.sync.key("billing"), value, "PX", "3600000")
        await wait_for(lambda: a.stage.state == "open")
        assert a.stage.time_until_half_open() <= 2.0


async def test_garbage_entries_are_ignored(server: RedisServer, prefix: str) -> None:
    async with replicas(server.url, prefix, n=1) as (a,):
        key = a.sync.key("billing")
        server.command("SET", key, "not json", "PX", "60000")
        await trio.sleep(4 * SYNC_INTERVAL_S)
        server.command("SET", key, json.dumps({"v": 1}), "PX", "60000")  # no replica
        await trio.sleep(4 * SYNC_INTERVAL_S)
        server.command("SET", key, json.dumps({"replica": "x"}))  # no expiry: not ours
        await trio.sleep(4 * SYNC_INTERVAL_S)
        assert a.stage.state == "closed"
        assert a.sync.forced_opens == 0


async def test_redis_down_at_start_both_replicas_work_locally(prefix: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with replicas(dead, prefix) as (a, b):
        await trip(a.stage, a.upstream)
        await expect_open(a.stage)
        await trio.sleep(6 * SYNC_INTERVAL_S)
        for _ in range(20):  # B never heard of it and serves normally
            started = trio.current_time()
            assert (await b.stage(REQUEST)).status == 200
            assert trio.current_time() - started < 0.01
        assert b.stage.state == "closed"
        assert not a.runner.healthy
        assert not b.runner.healthy
        assert a.sync.sync_errors > 0


async def test_redis_killed_mid_run_then_back_sync_resumes(server: RedisServer, prefix: str) -> None:
    async with replicas(server.url, prefix) as (a, b):
        await trio.sleep(2 * SYNC_INTERVAL_S)  # both synced once
        server.kill()
        await trip(a.stage, a.upstream)  # local verdict while Redis is gone
        await trio.sleep(4 * SYNC_INTERVAL_S)
        assert b.stage.state == "closed"
        server.start()  # empty: no persistence
        # A writes its still-open breaker again by itself; B then picks it up.
        took_s = await wait_for(lambda: b.stage.state == "open", timeout_s=1.5)
        assert took_s < 1.5
        assert a.runner.healthy
        assert b.runner.healthy


async def test_a_frozen_redis_slows_no_request_and_sync_resumes_when_it_thaws(
    server: RedisServer, prefix: str
) -> None:
    async with replicas(server.url, prefix) as (a, b):
        await trio.sleep(2 * SYNC_INTERVAL_S)
        server.freeze()
        try:
            started = trio.current_time()
            await trip(a.stage, a.upstream)  # hooks only mark work: no Redis on this path
            with pytest.raises(BreakerOpen):
                await a.stage(REQUEST)
            assert trio.current_time() - started < 0.05
            for _ in range(10):
                started = trio.current_time()
                assert (await b.stage(REQUEST)).status == 200
                assert trio.current_time() - started < 0.01
                await trio.sleep(0.02)
        finally:
            server.thaw()
        await wait_for(lambda: b.stage.state == "open", timeout_s=1.5)


async def test_client_pause_is_survived_like_a_freeze(server: RedisServer, prefix: str) -> None:
    async with replicas(server.url, prefix) as (a, b):
        await trio.sleep(2 * SYNC_INTERVAL_S)
        server.command("CLIENT", "PAUSE", "400", "ALL")
        started = trio.current_time()
        await trip(a.stage, a.upstream)
        assert trio.current_time() - started < 0.05
        await wait_for(lambda: b.stage.state == "open", timeout_s=1.5)
