"""Rate limits and upstream-quota awareness end to end: client -> daemon -> fake upstream, and
two daemons sharing one limit through a private redis-server."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator

import pytest
import trio

from resilient_ambassador.core.config import Config, QuotaConfig, RateLimitConfig, RedisConfig, RouteConfig
from resilient_ambassador.core.templates import parse_template
from resilient_ambassador.secrets import SecretResolver
from tests.stores.redis_server import RedisServer, redis_server
from tests.support.canary import SecretScan
from tests.support.client import http_request
from tests.support.daemon import simple_config, start_daemon, upstream_config
from tests.support.process import free_port
from tests.support.upstream import Reply, start_fake_upstream

# Slow refill: nothing comes back during a test, so counts are exact.
THREE_PER_MINUTE = RateLimitConfig(count=3, period_s=60.0, burst=3)


def limited(url: str, limit: RateLimitConfig, **upstream: object) -> Config:
    return simple_config(
        upstream_config(url, **upstream),  # type: ignore[arg-type]
        routes=[RouteConfig(upstream="up", name="api", rate_limit=limit)],
    )


async def get_stats(port: int) -> dict[str, object]:
    stats: dict[str, object] = json.loads((await http_request(port, "GET", "/stats")).body)
    return stats


async def test_over_the_limit_answers_429_with_headers_and_the_upstream_sees_nothing(
    nursery: trio.Nursery,
) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, limited(upstream.url(), THREE_PER_MINUTE))

    statuses = [(await http_request(daemon.port, "GET", "/")).status for _ in range(3)]
    refused = await http_request(daemon.port, "GET", "/")

    assert statuses == [200, 200, 200]
    assert refused.status == 429
    assert refused.header("retry-after") == "20"
    assert refused.header("ratelimit-policy") == '"api";q=3;w=60'
    assert refused.header("ratelimit") == '"api";r=0;t=20'
    assert refused.header("x-ambassador-error") == "rate_limited"
    assert json.loads(refused.body)["error"] == "rate_limited"
    assert len(upstream.received) == 3
    stats = await get_stats(daemon.admin_port)
    route = stats["rate_limits"]["routes"]["api"]  # type: ignore[index]
    assert (route["admitted"], route["rejected"]) == (3, 1)


async def test_queue_mode_admits_later_at_the_rate(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    limit = RateLimitConfig(count=20, period_s=1.0, burst=1, mode="queue", max_wait_s=1.0)
    daemon = await start_daemon(nursery, limited(upstream.url(), limit))
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await http_request(daemon.port, "GET", "/")).status)

    started = trio.current_time()
    async with trio.open_nursery() as clients:
        for _ in range(4):
            clients.start_soon(one)
    elapsed = trio.current_time() - started

    assert statuses == [200] * 4
    assert elapsed >= 0.15 - 0.01  # three waited for slots 50 ms apart
    stats = await get_stats(daemon.admin_port)
    assert stats["rate_limits"]["routes"]["api"]["queued"] == 3  # type: ignore[index]


async def test_upstream_429_with_retry_after_pauses_further_calls(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    upstream.script(Reply(status=429, headers=[("retry-after", "60")], body=b"slow down"))
    config = simple_config(upstream_config(upstream.url(), quota=QuotaConfig(enabled=True, mode="reject")))
    daemon = await start_daemon(nursery, config)

    first = await http_request(daemon.port, "GET", "/")
    held = await http_request(daemon.port, "GET", "/")

    assert (first.status, first.body) == (429, b"slow down")  # the upstream's own answer
    assert held.status == 429
    assert held.header("x-ambassador-error") == "upstream_quota_exhausted"
    assert held.header("retry-after") in ("59", "60")
    assert len(upstream.received) == 1  # not hammered
    stats = await get_stats(daemon.admin_port)
    quota = stats["rate_limits"]["upstream_quota"]["up"]  # type: ignore[index]
    assert (quota["paused"], quota["rejected"]) == (1, 1)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


async def test_two_daemons_share_one_redis_limit(nursery: trio.Nursery, redis: RedisServer) -> None:
    upstream = await start_fake_upstream(nursery)
    limit = dataclasses.replace(THREE_PER_MINUTE, backend="redis")
    config = dataclasses.replace(
        limited(upstream.url(), limit), redis=RedisConfig(url=redis.url, key_prefix=f"t-{uuid.uuid4().hex}:")
    )
    pod_a = await start_daemon(nursery, config)
    pod_b = await start_daemon(nursery, config)

    statuses = [(await http_request(pod.port, "GET", "/")).status for pod in (pod_a, pod_b) * 3]

    assert sorted(statuses) == [200, 200, 200, 429, 429, 429]
    assert len(upstream.received) == 3


async def test_two_daemons_leasing_tokens_share_the_limit_in_fewer_redis_calls(
    nursery: trio.Nursery, redis: RedisServer
) -> None:
    """Six a minute, leases of three: each daemon takes three in one script run and answers
    the next two itself; together they still admit six."""
    upstream = await start_fake_upstream(nursery)
    limit = dataclasses.replace(THREE_PER_MINUTE, count=6, burst=6, backend="redis", lease=3)
    config = dataclasses.replace(
        limited(upstream.url(), limit), redis=RedisConfig(url=redis.url, key_prefix=f"t-{uuid.uuid4().hex}:")
    )
    pod_a = await start_daemon(nursery, config)
    pod_b = await start_daemon(nursery, config)

    statuses = [(await http_request(pod.port, "GET", "/")).status for pod in (pod_a, pod_b) * 4]

    assert statuses == [200] * 6 + [429] * 2
    assert len(upstream.received) == 6
    for pod in (pod_a, pod_b):
        route = (await get_stats(pod.admin_port))["rate_limits"]["routes"]["api"]  # type: ignore[index]
        assert (route["admitted"], route["rejected"]) == (3, 1)
        # one lease, one refused ask; two decisions answered from the lease
        redis_counts = route["backend_round_trips"], route["backend_script_runs"], route["backend_leased"]
        assert redis_counts == (2, 2, 2)


async def test_redis_down_at_start_falls_back_to_the_local_share(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    limit = dataclasses.replace(THREE_PER_MINUTE, count=6, burst=6, backend="redis", expected_replicas=2)
    config = dataclasses.replace(
        limited(upstream.url(), limit), redis=RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0")
    )
    daemon = await start_daemon(nursery, config)

    statuses = [(await http_request(daemon.port, "GET", "/")).status for _ in range(4)]

    assert statuses == [200, 200, 200, 429]  # half of the burst of 6: no 5xx because Redis failed
    stats = await get_stats(daemon.admin_port)
    assert stats["rate_limits"]["routes"]["api"]["backend_fallbacks"] == 4  # type: ignore[index]


async def test_an_upstream_pause_is_shared_through_redis(nursery: trio.Nursery, redis: RedisServer) -> None:
    upstream = await start_fake_upstream(nursery)
    upstream.script(Reply(status=429, headers=[("retry-after", "60")]))
    quota = QuotaConfig(enabled=True, mode="reject", shared="redis")
    config = dataclasses.replace(
        simple_config(upstream_config(upstream.url(), quota=quota)),
        redis=RedisConfig(url=redis.url, key_prefix=f"t-{uuid.uuid4().hex}:"),
    )
    pod_a = await start_daemon(nursery, config)
    pod_b = await start_daemon(nursery, config)

    assert (await http_request(pod_a.port, "GET", "/")).status == 429  # the upstream's
    tracker_b = pod_b.app.quotas["up"]
    with trio.fail_after(3):  # the sync polls every 0.5 s
        while True:
            if tracker_b.state.paused_for(trio.current_time()) > 0:
                break
            await trio.sleep(0.02)
    held = await http_request(pod_b.port, "GET", "/")

    assert held.header("x-ambassador-error") == "upstream_quota_exhausted"
    assert 55 <= int(held.header("retry-after") or 0) <= 60
    assert len(upstream.received) == 1  # pod B never asked
    assert pod_b.app.quota_sync is not None
    assert pod_b.app.quota_sync.applied == 1


async def test_a_credential_keyed_limit_never_puts_the_credential_in_redis(
    nursery: trio.Nursery, redis: RedisServer
) -> None:
    canary = "canary-credential-9a4e17"
    upstream = await start_fake_upstream(nursery)
    limit = dataclasses.replace(THREE_PER_MINUTE, key="credential", backend="redis")
    config = dataclasses.replace(
        limited(upstream.url(), limit, headers=(("X-Api-Key", parse_template("${API_KEY}")),)),
        redis=RedisConfig(url=redis.url),
    )
    daemon = await start_daemon(nursery, config, SecretResolver({"API_KEY": canary}))
    hostile = [("X-Api-Key", canary + " *?[]"), ("X-Client-Id", canary)]

    statuses = [(await http_request(daemon.port, "GET", "/", headers=hostile)).status for _ in range(4)]

    assert statuses == [200, 200, 200, 429]
    assert [r.header("x-api-key") for r in upstream.received] == [canary] * 3  # injected, replaced
    assert SecretScan(canary).redis_keys(redis.url, "ra:rl:") == 1  # one bucket, no credential


def test_memory_limits_are_shared_out_across_workers() -> None:
    from resilient_ambassador.app import App

    limit = RateLimitConfig(count=10, period_s=1.0, burst=5)
    route = RouteConfig(upstream="up", name="r", rate_limit=limit)
    config = simple_config(upstream_config("http://127.0.0.1:9"), routes=[route])
    app = App(dataclasses.replace(config, workers=4))
    stage = app.rate_limits["r"]
    assert (stage.config.count, stage.config.burst) == (2.5, 2)  # each of 4 workers: a quarter


async def test_a_reload_keeps_the_buckets(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    route = RouteConfig(upstream="up", name="r", rate_limit=THREE_PER_MINUTE)
    config = simple_config(upstream_config(upstream.url()), routes=[route])
    daemon = await start_daemon(nursery, config)
    statuses = [(await http_request(daemon.port, "GET", "/")).status for _ in range(3)]
    listener = dataclasses.replace(config.listeners[0], port=daemon.port)
    await daemon.app.reload(dataclasses.replace(config, listeners=(listener,)))
    after = await http_request(daemon.port, "GET", "/")
    assert statuses == [200, 200, 200]
    assert after.status == 429  # the spent burst stayed spent across the reload
