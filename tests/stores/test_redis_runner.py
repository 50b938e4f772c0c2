"""RedisRunner and make_redis against real, private redis-server processes (never the shared
one on 6379: these tests kill, freeze and pause their Redis)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import trio

from resilient_ambassador.stores.errors import StoreUnavailable
from resilient_ambassador.stores.redis_client import RedisRunner, make_redis
from tests.stores.redis_server import RedisServer, redis_server
from tests.support.process import free_port

BUDGET_S = 0.2
SLACK_S = 0.15  # thread hand-off and a loaded CI machine


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
async def runner(server: RedisServer) -> AsyncIterator[RedisRunner]:
    runner = RedisRunner(make_redis(server.url, timeout_s=BUDGET_S), budget_s=BUDGET_S, cooldown_s=0.3)
    try:
        yield runner
    finally:
        await runner.aclose()


def key() -> str:
    return f"test:{secrets.token_hex(6)}:k"


async def test_calls_run_and_return_results(runner: RedisRunner) -> None:
    k = key()
    assert await runner.call(lambda c: c.set(k, b"v", px=5000))
    assert await runner.call(lambda c: c.get(k)) == b"v"
    assert runner.healthy
    assert runner.failures == 0


def test_make_redis_has_no_retries_and_fails_fast_on_a_dead_port() -> None:
    client = make_redis(f"redis://127.0.0.1:{free_port()}/0", timeout_s=BUDGET_S)
    try:
        retry = client.get_connection_kwargs()["retry"]
        assert retry.get_retries() == 0
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        assert time.monotonic() - started < 0.1  # refused: no retries, no backoff
    finally:
        client.close()


def test_make_redis_times_out_once_on_a_frozen_server(server: RedisServer) -> None:
    client = make_redis(server.url, timeout_s=BUDGET_S)
    try:
        client.ping()
        server.freeze()
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        # One socket timeout, not redis-py's default retries (~9 s in HARDENING.md).
        assert time.monotonic() - started < BUDGET_S + SLACK_S
    finally:
        server.thaw()
        client.close()


async def test_dead_port_fails_fast_then_trips_and_skips_without_calling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_ambassador.redis")
    runner = RedisRunner.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout_s=BUDGET_S)
    try:
        started = trio.current_time()
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                await runner.call(lambda c: c.ping())
        assert trio.current_time() - started < 0.2
        assert not runner.healthy
        calls = runner.calls
        for _ in range(50):  # cooling down: no thread, no socket, no log line
            with pytest.raises(StoreUnavailable, match="cooling down"):
                await runner.call(lambda c: c.ping())
        assert runner.calls == calls
        assert runner.skipped == 50
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "redis unavailable" in warnings[0].getMessage()
    finally:
        await runner.aclose()


async def test_frozen_server_costs_one_budget_then_nothing(server: RedisServer, runner: RedisRunner) -> None:
    await runner.call(lambda c: c.ping())
    server.freeze()
    try:
        for _ in range(2):
            started = trio.current_time()
            with pytest.raises(StoreUnavailable, match="budget"):
                await runner.call(lambda c: c.ping())
            assert trio.current_time() - started < BUDGET_S + SLACK_S
        started = trio.current_time()
        with pytest.raises(StoreUnavailable, match="cooling down"):
            await runner.call(lambda c: c.ping())
        assert trio.current_time() - started < 0.01
        assert not runner.healthy
    finally:
        server.thaw()


async def test_client_pause_times_out_within_the_budget(server: RedisServer, runner: RedisRunner) -> None:
    await runner.call(lambda c: c.ping())
    assert server.command("CLIENT", "PAUSE", "1000", "ALL").startswith(b"+OK")
    started = trio.current_time()
    with pytest.raises(StoreUnavailable):
        await runner.call(lambda c: c.get("x"))
    assert trio.current_time() - started < BUDGET_S + SLACK_S
    server.command("CLIENT", "UNPAUSE")


async def test_recovers_by_itself_after_a_restart(
    server: RedisServer, runner: RedisRunner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_ambassador.redis")
    k = key()
    await runner.call(lambda c: c.set(k, b"1"))
    server.kill()
    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            await runner.call(lambda c: c.get(k))
    assert not runner.healthy
    server.start()
    with trio.fail_after(2):
        while True:
            try:
                await runner.call(lambda c: c.ping())
                break
            except StoreUnavailable:
                await trio.sleep(0.05)
    assert runner.healthy
    messages = [r.getMessage() for r in caplog.records]
    assert sum("redis unavailable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1


async def test_a_refused_command_is_unavailable_but_redis_stays_healthy(runner: RedisRunner) -> None:
    k = key()
    await runner.call(lambda c: c.set(k, b"text"))
    for _ in range(3):
        with pytest.raises(StoreUnavailable, match="refused"):
            await runner.call(lambda c: c.incr(k))  # WRONGTYPE-ish: not an integer
    assert runner.healthy
    assert await runner.call(lambda c: c.get(k)) == b"text"


async def test_caller_cancellation_propagates_and_is_not_a_failure(
    server: RedisServer, runner: RedisRunner
) -> None:
    await runner.call(lambda c: c.ping())
    server.freeze()
    try:
        with trio.move_on_after(0.05) as scope:
            await runner.call(lambda c: c.ping(), budget_s=5.0)
        assert scope.cancelled_caught
        assert runner.failures == 0
        assert runner.healthy
    finally:
        server.thaw()


async def test_a_slow_call_past_its_own_budget_is_abandoned(server: RedisServer) -> None:
    runner = RedisRunner(make_redis(server.url, timeout_s=2.0), budget_s=0.1)
    try:
        started = trio.current_time()
        with pytest.raises(StoreUnavailable, match="budget"):
            await runner.call(lambda c: c.blpop([key()], timeout=0.5))  # Redis answers in 0.5 s
        assert trio.current_time() - started < 0.1 + SLACK_S
    finally:
        await runner.aclose()
