"""The secret canary (issue #11): one daemon with every feature that touches the injected
credential, driven through forwarding, retries, errors, timeouts, a redirect, the Redis cache,
a credential-keyed Redis rate limit, a shared breaker and a shared upstream quota, then Redis
dying, with tracing to an in-memory exporter, metrics, an access log file and DEBUG logging.
The credentials are unique canaries (a header from the environment and a query parameter from
a file on one upstream, the other way round on the second; the file is rotated mid-run), so is
the Redis password, and a careless upstream echoes what it received in every response's
headers. Then every sink is scanned (tests/support/canary.py):
nothing the client got, no log record, no access-log line, no span, no metric, no admin
document and no Redis key or value under the test's prefix may hold a canary.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import trio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from resilient_ambassador.core.config import (
    AccessLogConfig,
    BreakerConfig,
    CacheStoreConfig,
    QuotaConfig,
    RateLimitConfig,
    RedisConfig,
    RetryConfig,
    RouteCacheConfig,
    RouteConfig,
    TelemetryConfig,
)
from resilient_ambassador.core.templates import parse_template
from resilient_ambassador.telemetry import Telemetry
from tests.stores.redis_server import RedisServer, redis_server
from tests.support.canary import Canary
from tests.support.client import ClientResponse, http_request
from tests.support.daemon import NO_RETRY, simple_config, start_daemon, upstream_config
from tests.support.upstream import Received, Reply, start_fake_upstream


def careless(received: Received) -> Reply:
    """An upstream that reflects the credential and the full target it received in headers
    (the daemon must drop them), and acts on the path."""
    path = received.target.split(b"?")[0]
    echo = (
        ("content-type", "text/plain"),
        ("x-echo-key", received.header("x-api-key") or ""),
        ("x-echo-target", received.target.decode("latin-1")),
    )
    if path == b"/garbage":
        return Reply(raw=b"HTTP/1.1 2OO OK\r\n\r\n", close_after=True)
    if path == b"/redirect":
        location = "http://elsewhere.example" + received.target.decode("latin-1")
        return Reply(status=302, headers=(*echo, ("location", location)), body=b"")
    if path == b"/slow":
        return Reply(headers=echo, delay_s=2.0)
    if path.startswith(b"/cache/"):
        return Reply(headers=(*echo, ("cache-control", "max-age=60")), body=b"cached")
    if path == b"/quota":
        return Reply(status=429, headers=(*echo, ("retry-after", "60")), body=b"slow down")
    if path.startswith(b"/flaky"):
        return Reply(status=503, headers=echo, body=b"unavailable")
    return Reply(headers=echo, body=b"ok")


async def test_no_sink_ever_holds_the_injected_credential(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    canary = Canary(tmp_path)
    with redis_server() as server:
        await _scenario(nursery, tmp_path, caplog, canary, server)


async def _scenario(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    canary: Canary,
    server: RedisServer,
) -> None:
    upstream = await start_fake_upstream(nursery, default=careless)
    breaker = BreakerConfig(
        failure_threshold=2, min_requests=0, reset_timeout_s=30.0, shared="redis", sync_interval_s=0.05
    )
    up = upstream_config(
        upstream.url(),
        headers=canary.headers,
        query=canary.query,
        quota=QuotaConfig(enabled=True, mode="reject", shared="redis"),
    )
    # The other way round: the header from the file, the query parameter from the environment.
    flaky = upstream_config(
        upstream.url(),
        name="flaky",
        headers=(("X-Api-Key", parse_template(f"Bearer ${{file:{canary.file}}}")),),
        query=(("api_key", parse_template("${API_KEY}")),),
        breaker=breaker,
    )
    rate_limit = RateLimitConfig(count=3, period_s=60.0, burst=3, key="credential", backend="redis")
    routes = [
        RouteConfig(upstream="up", name="slow", prefix="/slow", timeout_s=0.3, retry=NO_RETRY),
        RouteConfig(upstream="up", name="cache", prefix="/cache", cache=RouteCacheConfig(enabled=True)),
        RouteConfig(upstream="up", name="rl", prefix="/rl", rate_limit=rate_limit),
        RouteConfig(upstream="flaky", name="flaky", prefix="/flaky", retry=NO_RETRY),
        RouteConfig(upstream="up", name="api", retry=RetryConfig(retries=1)),
    ]
    prefix = f"canary-{canary.env_value[-8:]}:"
    server.command("CONFIG", "SET", "requirepass", canary.redis_password)
    redis_url = f"redis://:{canary.redis_password}@127.0.0.1:{server.port}/0"
    access_log = tmp_path / "access.log"
    config = dataclasses.replace(
        simple_config(up, routes=routes, extra_upstreams=[flaky]),
        redis=RedisConfig(url=redis_url, key_prefix=prefix),
        cache=CacheStoreConfig(backend="redis"),
        access_log=AccessLogConfig(path=str(access_log)),
    )
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(TelemetryConfig(), {}, span_exporter=exporter)
    daemon = await start_daemon(nursery, config, canary.resolver(), telemetry)
    responses: list[tuple[str, ClientResponse]] = []

    async def get(target: str, headers: list[tuple[str, str]] | None = None) -> ClientResponse:
        # The app sends its own (wrong) copy of the credential: replaced, never echoed back.
        sent = [("x-api-key", "app-guess"), *(headers or [])]
        response = await http_request(daemon.port, "GET", target, sent)
        responses.append((target, response))
        return response

    assert (await get("/echo?x=1&api_key=app-guess")).status == 200
    upstream.script(Reply(status=503, headers=(("x-echo-key", canary.env_value),)), careless)
    assert (await get("/retried")).status == 200  # a 503, then the retry
    assert (await get("/garbage")).status == 502
    assert (await get("/slow")).status == 504
    redirect = await get("/redirect?next=1")
    assert redirect.status == 302  # passed on, never followed
    assert [(await get("/cache/a")).status for _ in range(2)] == [200, 200]
    assert [(await get("/rl")).status for _ in range(4)] == [200, 200, 200, 429]
    original, rotated = (
        canary.file_value,
        canary.rotate(),
    )  # the Secret is rotated mid-run: both values stay secret
    assert (await get("/echo?rotated=1")).status == 200
    assert upstream.received[-1].target == f"/echo?rotated=1&api_key={rotated}".encode()
    assert [(await get("/flaky/x")).status for _ in range(3)] == [503, 503, 503]
    assert responses[-1][1].header("x-ambassador-error") == "circuit_open"
    assert (await get("/quota")).status == 429  # the upstream's; the pause is shared
    held = await get("/after-quota")
    assert held.header("x-ambassador-error") == "upstream_quota_exhausted"

    # The canaries did reach the upstream, so every scan below is looking for something real.
    first, flaky_seen = upstream.received[0], upstream.received[-2]
    assert first.header_values("x-api-key") == [canary.env_value]
    assert first.target == f"/echo?x=1&api_key={original}".encode()
    assert flaky_seen.header_values("x-api-key") == [f"Bearer {rotated}"]
    assert flaky_seen.target.endswith(f"api_key={canary.env_value}".encode())

    # Redis holds what the shared features wrote once their background tasks ran.
    assert daemon.app.cache_store is not None
    await daemon.app.cache_store.flush()
    with trio.fail_after(5):
        while not (  # noqa: ASYNC110 (background syncs, no event to wait on)
            daemon.app.breaker_sync is not None
            and daemon.app.breaker_sync.published
            and daemon.app.quota_sync is not None
            and daemon.app.quota_sync.published
        ):
            await trio.sleep(0.02)
    scan = canary.scan
    # Entries, their URL sets and index, a bucket, the breaker and the quota.
    assert scan.redis_keys(redis_url, prefix) >= 5

    # Then Redis dies: its errors reach logs, /stats and the fallbacks, never a secret.
    server.kill()
    # The cache read and the rate-limit decision go to the dead Redis first; the quota pause
    # (held locally) then answers.
    after = [await get(t) for t in ("/cache/b", "/rl", "/echo?after=redis")]
    assert [r.header("x-ambassador-error") for r in after] == ["upstream_quota_exhausted"] * 3
    assert any(r.name == "resilient_ambassador.redis" for r in caplog.records)
    assert daemon.app.access_log is not None
    await daemon.app.access_log.flush()

    for target, response in responses:
        scan.response(response, f"the response to {target}")
    admin = await scan.admin(daemon.admin_port)
    assert set(admin) == {"/config", "/stats", "/metrics", "/healthz", "/readyz"}
    assert b"ambassador_retries" in admin["/metrics"]
    assert scan.spans(exporter.get_finished_spans()) >= len(responses)
    log_lines = access_log.read_text().splitlines()
    assert len(log_lines) >= len(responses)
    scan.absent("the access log", "\n".join(log_lines))
    assert scan.log_records(caplog.records) > 0
    daemon.app.stop_now()
