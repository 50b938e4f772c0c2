"""The admin listener over real sockets: health, readiness through a drain, stats, the
redacted config, and what it refuses."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from typing import Any

import pytest
import trio

from resilient_ambassador.app import App
from resilient_ambassador.core.config import AdminConfig, BreakerConfig, RedisConfig
from resilient_ambassador.core.redact import config_document, redact_template, redact_url
from resilient_ambassador.core.templates import parse_template
from resilient_ambassador.secrets import SecretResolver
from resilient_ambassador.stages.breaker import BreakerStats
from tests.support.canary import SecretScan
from tests.support.client import HttpClient, RawConnection, http_request
from tests.support.daemon import simple_config, start_daemon, upstream_config
from tests.support.upstream import Reply, echo, start_fake_upstream

CANARY = "admin-canary-9c4f2a"
LITERAL_CANARY = "literal-canary-31b7"
REDIS_PASSWORD = "redis-canary-77e0"


async def _json(port: int, path: str) -> Any:
    response = await http_request(port, "GET", path)
    assert response.status == 200
    assert response.header("content-type") == "application/json"
    assert response.header("cache-control") == "no-store"
    return json.loads(response.body)


async def test_healthz_and_ready(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    assert daemon.admin_port != daemon.port

    health = await http_request(daemon.admin_port, "GET", "/healthz")
    ready = await http_request(daemon.admin_port, "GET", "/readyz?verbose=1")
    head = await http_request(daemon.admin_port, "HEAD", "/healthz")

    assert (health.status, health.body, health.header("connection")) == (200, b"ok\n", "close")
    assert (ready.status, ready.body) == (200, b"ready\n")
    assert (head.status, head.body, head.header("content-length")) == (200, b"", "3")
    assert upstream.received == []  # admin requests are never forwarded


async def test_readyz_turns_503_during_drain_and_admin_closes_last(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    upstream.script(Reply(delay_s=0.5, body=b"finished"))
    results: list[int] = []

    with trio.fail_after(5):
        async with trio.open_nursery() as daemon_nursery:
            daemon = await start_daemon(daemon_nursery, simple_config(upstream_config(upstream.url())))
            admin_port = daemon.admin_port
            assert (await http_request(admin_port, "GET", "/readyz")).status == 200

            async def in_flight() -> None:
                async with await HttpClient.connect(daemon.port) as client:
                    results.append((await client.request("GET", "/slow")).status)

            daemon_nursery.start_soon(in_flight)
            await upstream.wait_received(1)
            daemon.app.drain()

            # The slow request keeps the drain open; the admin listener still answers.
            draining = await http_request(admin_port, "GET", "/readyz")
            health = await http_request(admin_port, "GET", "/healthz")
            stats = await _json(admin_port, "/stats")
            with pytest.raises(OSError, match="all attempts to connect"):
                await trio.open_tcp_stream("127.0.0.1", daemon.port)
        # serve() has returned: the admin listener is closed too.

    assert (draining.status, draining.body) == (503, b"draining\n")
    assert health.status == 200
    assert (stats["draining"], stats["ready"]) == (True, False)
    assert results == [200]
    with pytest.raises(OSError, match="all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", admin_port)


async def test_stats_shape_and_counters(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    config = simple_config(upstream_config(upstream.url(), breaker=BreakerConfig(min_requests=0)))
    daemon = await start_daemon(nursery, config)

    before = await _json(daemon.admin_port, "/stats")
    upstream.script(Reply(), Reply(status=503))
    async with await HttpClient.connect(daemon.port) as client:
        assert (await client.request("GET", "/")).status == 200
        assert (await client.request("GET", "/")).status == 503
        during = await _json(daemon.admin_port, "/stats")
    async with await RawConnection.connect(daemon.port) as raw:
        await raw.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n")
        assert (await raw.receive_until_closed()).data.startswith(b"HTTP/1.1 413 ")
    after = await _json(daemon.admin_port, "/stats")

    assert set(before) == {
        "ready",
        "draining",
        "uptime_s",
        "tasks",
        "listeners",
        "upstreams",
        "breakers",
        "shared_breaker",
        "redis",
        "access_log",
        "reloads",
        "pid",
        "worker",
        "rate_limits",
        "tcp_listeners",
        "cache",
        "dns",
        "gc",
    }
    assert (before["ready"], before["draining"], before["shared_breaker"], before["redis"]) == (
        True,
        False,
        None,
        None,
    )
    assert (before["pid"], before["worker"]) == (os.getpid(), None)
    assert set(before["access_log"]) == {"lines", "dropped", "write_errors"}
    assert before["tcp_listeners"] == {}
    # Embedded in the test process, which never settles: Python's defaults, nothing frozen.
    assert set(before["gc"]) == {"collections", "collected", "frozen", "thresholds"}
    assert before["gc"]["frozen"] == 0
    assert before["cache"] is None  # no route has the cache on
    assert before["dns"]["entries"] == 0  # the upstream is an IP literal: no lookup
    assert before["dns"]["lookups"] == 0
    assert before["uptime_s"] >= 0
    assert before["tasks"] > 0
    assert before["listeners"]["main"] == {
        "open_connections": 0,
        "requests": 0,
        "responses": {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0},
    }
    assert before["upstreams"] == {"up": {"in_use": 0, "idle": 0, "opened": 0}}
    assert set(before["breakers"]["up"]) == {f.name for f in dataclasses.fields(BreakerStats)}
    assert during["listeners"]["main"]["open_connections"] == 1
    assert during["upstreams"]["up"] == {"in_use": 0, "idle": 1, "opened": 1}
    main = after["listeners"]["main"]
    assert main["requests"] == 3
    assert main["responses"] == {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 1, "5xx": 1}
    breaker = after["breakers"]["up"]
    assert (breaker["state"], breaker["successes"], breaker["failures"]) == ("closed", 1, 1)


async def test_config_is_redacted(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    secrets = SecretResolver(environ={"API_KEY": CANARY})
    config = simple_config(
        upstream_config(
            upstream.url(),
            headers=(
                ("Authorization", parse_template("Bearer ${API_KEY}")),
                ("X-Static-Key", parse_template(LITERAL_CANARY)),
            ),
            query=(("api_key", parse_template("${API_KEY}")),),
        )
    )
    config = dataclasses.replace(config, redis=RedisConfig(url=f"redis://app:{REDIS_PASSWORD}@127.0.0.1:1/0"))
    for _, template in config.upstreams["up"].headers:
        secrets.check(template)
    daemon = await start_daemon(nursery, config, secrets)
    # The secret is resolved and sent upstream, so it exists in the process...
    assert (await http_request(daemon.port, "GET", "/")).status == 200
    assert CANARY.encode() in upstream.received[0].raw

    # ...but never in what the admin listener says.
    bodies = await SecretScan(CANARY, LITERAL_CANARY, REDIS_PASSWORD).admin(daemon.admin_port)
    assert {"/config", "/stats", "/healthz", "/readyz"} <= set(bodies)
    doc = json.loads(bodies["/config"])
    up = doc["upstreams"]["up"]
    assert up["headers"] == {"Authorization": "Bearer ${API_KEY}", "X-Static-Key": "<redacted>"}
    assert up["query"] == {"api_key": "${API_KEY}"}
    assert doc["redis"]["url"] == "redis://app:<redacted>@127.0.0.1:1/0"
    assert doc["listeners"][0]["name"] == "main"
    assert doc["admin"] == {"enabled": True, "host": "127.0.0.1", "port": 0}


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Bearer ${file:/run/secrets/token}", "Bearer ${file:/run/secrets/token}"),
        ("${A}${B}", "${A}${B}"),
        ("sk_live_abc", "<redacted>"),
        ("Bearer sk_live_abc", "<redacted>"),
        ("key-${A}", "<redacted>${A}"),
    ],
)
def test_redact_template(text: str, shown: str) -> None:
    assert redact_template(parse_template(text)) == shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@redis:6379/0", "redis://:<redacted>@redis:6379/0"),
        ("rediss://user:pw@redis/0", "rediss://user:<redacted>@redis/0"),
        ("redis://redis:6379/0?password=pw&db=1", "redis://redis:6379/0?password=<redacted>&db=1"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


async def test_unknown_path_and_method(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))

    missing = await http_request(daemon.admin_port, "GET", "/nope")
    post = await http_request(daemon.admin_port, "POST", "/stats", body=b"{}")
    async with await RawConnection.connect(daemon.admin_port) as garbage:
        await garbage.send(b"NOT HTTP\r\n\r\n")
        bad = await garbage.receive_until_closed()

    assert missing.status == 404
    assert json.loads(missing.body)["error"] == "not_found"
    assert post.status == 405
    assert post.header("allow") == "GET, HEAD"
    assert bad.data.startswith(b"HTTP/1.1 400 ")
    assert upstream.received == []


async def test_admin_can_be_disabled(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    config = simple_config(upstream_config(upstream.url()), admin=AdminConfig(enabled=False))
    daemon = await start_daemon(nursery, config)
    assert daemon.app.admin is None
    assert daemon.app.admin_addresses == []
    assert (await http_request(daemon.port, "GET", "/")).status == 200


def test_config_document_shapes() -> None:
    config = simple_config(upstream_config("http://127.0.0.1:9"))
    doc: Any = json.loads(json.dumps(config_document(config)))  # every value is JSON
    up = doc["upstreams"]["up"]
    assert (up["headers"], up["query"], up["url"]) == ({}, {}, "http://127.0.0.1:9")
    assert doc["redis"]["url"] is None


async def test_admin_port_in_use_fails_the_whole_bind() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = simple_config(upstream_config("http://127.0.0.1:9"), admin=AdminConfig(port=port))
        app = App(config)
        # The data listener, bound first, is closed again (an unclosed socket would fail the
        # run: warnings are errors).
        with pytest.raises(OSError, match=r"(?i)in use"):
            await app.bind()
