"""Retries, breaker and deadlines end to end: client -> daemon -> scriptable upstream."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid

import trio
import trio.testing

from resilient_ambassador.core.config import BreakerConfig, PoolConfig, RedisConfig, RetryConfig, RouteConfig
from resilient_ambassador.stages.breaker import BreakerStage
from tests.stores.redis_server import redis_server
from tests.support.client import HttpClient, http_request
from tests.support.daemon import simple_config, start_daemon, upstream_config
from tests.support.upstream import Reply, echo, parse_echo, start_fake_upstream

BREAKER = BreakerConfig(failure_threshold=3, min_requests=0, reset_timeout_s=30.0)


async def test_get_is_retried_after_503_by_default(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    route = RouteConfig(upstream="up")  # the shipped defaults: one retry for idempotent methods
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), routes=[route]))
    upstream.script(Reply(status=503, body=b"busy"), Reply(body=b"second"), Reply(status=503))

    retried = await http_request(daemon.port, "GET", "/")
    posted = await http_request(daemon.port, "POST", "/", body=b"once")

    assert (retried.status, retried.body) == (200, b"second")
    assert posted.status == 503  # POST is never replayed
    assert [r.method for r in upstream.received] == [b"GET", b"GET", b"POST"]


async def test_buffered_body_is_replayed_identically(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    retry = RetryConfig(retries=2, methods=frozenset({"POST"}))
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), retry=retry))
    upstream.script(Reply(status=502), Reply(drop="rst"))

    response = await http_request(daemon.port, "POST", "/", body=[b"chunk-1,", b"chunk-2"])

    assert response.status == 200
    assert parse_echo(response.body)["body"] == "chunk-1,chunk-2"
    assert [r.body for r in upstream.received] == [b"chunk-1,chunk-2"] * 3


async def test_breaker_opens_fails_fast_then_probes_and_closes(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    upstream = await start_fake_upstream(nursery, default=Reply(status=503))
    config = simple_config(upstream_config(upstream.url(), breaker=BREAKER))
    daemon = await start_daemon(nursery, config)

    statuses = [(await http_request(daemon.port, "GET", "/")).status for _ in range(3)]
    open_answer = await http_request(daemon.port, "GET", "/")

    assert statuses == [503, 503, 503]
    assert len(upstream.received) == 3  # the open breaker did not contact the upstream
    assert open_answer.status == 503
    assert open_answer.header("x-ambassador-error") == "circuit_open"
    assert open_answer.header("retry-after") == "30"
    assert json.loads(open_answer.body)["upstream"] == "up"

    mock_clock.jump(31)
    upstream.default = Reply(body=b"healthy")
    probe = await http_request(daemon.port, "GET", "/")
    after = await http_request(daemon.port, "GET", "/")

    assert (probe.status, probe.body, after.status) == (200, b"healthy", 200)
    assert len(upstream.received) == 5


async def test_half_open_lets_one_probe_through(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    upstream = await start_fake_upstream(nursery, default=Reply(status=503))
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url(), breaker=BREAKER)))
    for _ in range(3):
        await http_request(daemon.port, "GET", "/")
    mock_clock.jump(31)
    upstream.default = Reply(body=b"slow probe", delay_s=1.0)

    async with await HttpClient.connect(daemon.port) as prober, trio.open_nursery() as probing:
        probing.start_soon(prober.request, "GET", "/probe")
        await upstream.wait_received(4)
        refused = await http_request(daemon.port, "GET", "/other")
        mock_clock.jump(1.0)

    assert refused.header("x-ambassador-error") == "circuit_open"
    assert [r.target for r in upstream.received][3:] == [b"/probe"]


async def test_per_try_timeouts_count_as_breaker_failures(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=Reply(delay_s=5.0))
    breaker = BreakerConfig(failure_threshold=2, min_requests=0)
    retry = RetryConfig(retries=1, per_try_timeout_s=0.05, backoff_base_s=0.001, backoff_max_s=0.001)
    config = simple_config(upstream_config(upstream.url(), breaker=breaker), retry=retry)
    daemon = await start_daemon(nursery, config)

    timed_out = await http_request(daemon.port, "GET", "/")
    fast_fail = await http_request(daemon.port, "GET", "/")

    assert (timed_out.status, timed_out.header("x-ambassador-error")) == (504, "upstream_timeout")
    assert fast_fail.header("x-ambassador-error") == "circuit_open"
    assert len(upstream.received) == 2


async def test_retry_after_past_the_deadline_passes_the_answer_through(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    route = RouteConfig(upstream="up", timeout_s=2.0, retry=RetryConfig(retries=3))
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), routes=[route]))
    upstream.script(Reply(status=503, headers=[("retry-after", "120")], body=b"come back later"))

    with trio.fail_after(1):
        response = await http_request(daemon.port, "GET", "/")

    assert (response.status, response.body, response.header("retry-after")) == (
        503,
        b"come back later",
        "120",
    )
    assert len(upstream.received) == 1


async def test_client_deadline_header_shortens_and_is_stripped(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    route = RouteConfig(upstream="up", timeout_s=10.0, deadline_header="x-request-timeout")
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), routes=[route]))
    upstream.script(Reply(delay_s=5.0))

    with trio.fail_after(2):
        short = await http_request(daemon.port, "GET", "/", headers=[("X-Request-Timeout", "100ms")])
    normal = await http_request(daemon.port, "GET", "/", headers=[("X-Request-Timeout", "1h")])

    assert (short.status, short.header("x-ambassador-error")) == (504, "deadline_exceeded")
    assert normal.status == 200
    assert all(r.header("x-request-timeout") is None for r in upstream.received)


async def test_open_breaker_is_shared_through_redis(nursery: trio.Nursery) -> None:
    with contextlib.ExitStack() as stack:
        await _shared_breaker_scenario(nursery, stack)


async def _shared_breaker_scenario(nursery: trio.Nursery, stack: contextlib.ExitStack) -> None:
    """Two daemons (two pods) on one Redis: the upstream fails on A; B stops calling it."""
    upstream = await start_fake_upstream(nursery, default=Reply(status=503))
    breaker = BreakerConfig(
        failure_threshold=3, min_requests=0, reset_timeout_s=30.0, shared="redis", sync_interval_s=0.05
    )
    server = stack.enter_context(redis_server())  # our own: a fresh machine may run none on 6379
    redis = RedisConfig(url=server.url, key_prefix=f"test-{uuid.uuid4().hex}:")
    config = dataclasses.replace(simple_config(upstream_config(upstream.url(), breaker=breaker)), redis=redis)
    pod_a = await start_daemon(nursery, config)
    pod_b = await start_daemon(nursery, config)

    for _ in range(3):
        await http_request(pod_a.port, "GET", "/")
    assert (await http_request(pod_a.port, "GET", "/")).header("x-ambassador-error") == "circuit_open"

    breaker_b = pod_b.app.breakers["up"]
    assert isinstance(breaker_b, BreakerStage)
    with trio.fail_after(2):
        # B learns it from its background read of Redis; no traffic goes through B meanwhile.
        while breaker_b.state != "open":  # noqa: ASYNC110
            await trio.sleep(0.01)
    refused = await http_request(pod_b.port, "GET", "/")

    assert refused.header("x-ambassador-error") == "circuit_open"
    assert len(upstream.received) == 3  # only A's requests ever reached the upstream
    # The admin /stats shows the sync and Redis health, never the Redis URL.
    stats = json.loads((await http_request(pod_a.admin_port, "GET", "/stats")).body)
    shared = stats["shared_breaker"]
    assert shared["published"] >= 1
    assert shared["redis"]["healthy"] is True
    assert set(shared) == {"replica_id", "published", "cleared", "forced_opens", "sync_errors", "redis"}
    assert stats["breakers"]["up"]["state"] == "open"


async def test_route_deadline_applies_without_retries(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    route = RouteConfig(
        upstream="up", timeout_s=0.2, deadline_header="x-request-timeout", retry=RetryConfig(retries=0)
    )
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), routes=[route]))
    upstream.script(Reply(delay_s=5.0))

    with trio.fail_after(2):
        late = await http_request(daemon.port, "GET", "/")
    ok = await http_request(daemon.port, "GET", "/", headers=[("X-Request-Timeout", "1s")])

    assert late.header("x-ambassador-error") == "deadline_exceeded"
    assert ok.status == 200
    assert all(r.header("x-request-timeout") is None for r in upstream.received)


async def test_waiting_for_a_pool_slot_is_not_an_upstream_failure(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    breaker = BreakerConfig(failure_threshold=1, min_requests=0)
    retry = RetryConfig(retries=1, per_try_timeout_s=0.2, backoff_base_s=0.001, backoff_max_s=0.001)
    routes = [
        RouteConfig(upstream="up", prefix="/slow", retry=RetryConfig(retries=0)),  # holds the only connection
        RouteConfig(upstream="up", retry=retry),  # its per-try deadline runs out waiting for a slot
    ]
    config = simple_config(
        upstream_config(upstream.url(), breaker=breaker, pool=PoolConfig(max_connections=1)), routes=routes
    )
    daemon = await start_daemon(nursery, config)
    upstream.script(Reply(delay_s=0.6, body=b"slow"))

    async with trio.open_nursery() as clients:
        clients.start_soon(http_request, daemon.port, "GET", "/slow")
        await upstream.wait_received(1)
        starved = await http_request(daemon.port, "GET", "/starved")

    assert (starved.status, starved.header("x-ambassador-error")) == (503, "upstream_pool_exhausted")
    assert starved.header("retry-after") == "1"
    breaker_stage = daemon.app.breakers["up"]
    assert isinstance(breaker_stage, BreakerStage)
    assert breaker_stage.state == "closed"


async def test_route_with_its_own_breaker_does_not_cut_off_the_others(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    routes = [
        RouteConfig(upstream="up", prefix="/flaky", retry=RetryConfig(retries=0), breaker=BREAKER),
        RouteConfig(upstream="up", retry=RetryConfig(retries=0)),
    ]
    config = simple_config(upstream_config(upstream.url(), breaker=BREAKER), routes=routes)
    daemon = await start_daemon(nursery, config)
    upstream.script(*[Reply(status=503)] * 3)

    flaky = [(await http_request(daemon.port, "GET", "/flaky")).status for _ in range(3)]
    refused = await http_request(daemon.port, "GET", "/flaky")
    other = await http_request(daemon.port, "GET", "/other")

    assert flaky == [503, 503, 503]
    assert refused.header("x-ambassador-error") == "circuit_open"
    assert other.status == 200  # the upstream's shared breaker saw none of /flaky's failures
