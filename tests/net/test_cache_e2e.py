"""The response cache end to end: client -> daemon -> scriptable upstream, counting what the
upstream actually receives. Staleness comes from `Age` headers, never from waiting."""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any

import trio

from resilient_ambassador.core.config import (
    BreakerConfig,
    CacheStoreConfig,
    Config,
    RedisConfig,
    RouteCacheConfig,
    RouteConfig,
)
from resilient_ambassador.core.templates import parse_template
from resilient_ambassador.secrets import SecretResolver
from tests.stores.redis_server import redis_server
from tests.support.canary import SecretScan
from tests.support.client import HttpClient, http_request
from tests.support.daemon import NO_RETRY, RunningDaemon, simple_config, start_daemon, upstream_config
from tests.support.upstream import FakeUpstream, Received, Reply, start_fake_upstream

CACHE = RouteCacheConfig(enabled=True)
NO_RETRY_ROUTE = RouteConfig(upstream="up", name="api", cache=CACHE, retry=NO_RETRY)


def cacheable(body: bytes = b"ok", cc: str = "max-age=60", *extra: tuple[str, str], **kw: object) -> Reply:
    return Reply(headers=(("content-type", "text/plain"), ("cache-control", cc), *extra), body=body, **kw)  # type: ignore[arg-type]


def cache_config(upstream: FakeUpstream, *, route: RouteConfig = NO_RETRY_ROUTE, **fields: Any) -> Config:
    up = upstream_config(upstream.url(), **fields)
    return simple_config(up, routes=[route])


async def start(nursery: trio.Nursery, **fields: Any) -> tuple[FakeUpstream, RunningDaemon]:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, cache_config(upstream, **fields))
    return upstream, daemon


async def test_second_get_is_a_hit_with_age_and_cache_status(nursery: trio.Nursery) -> None:
    upstream, daemon = await start(nursery)
    upstream.script(cacheable(b"hello", "max-age=60", ("age", "7")))
    first = await http_request(daemon.port, "GET", "/v1/a")
    second = await http_request(daemon.port, "GET", "/v1/a")
    assert (first.body, second.body) == (b"hello", b"hello")
    assert first.header("cache-status") == "resilient-ambassador; fwd=uri-miss; stored"
    assert second.header("cache-status") in (
        "resilient-ambassador; hit; ttl=53",
        "resilient-ambassador; hit; ttl=52",
    )
    assert second.header("age") == "7"
    assert len(upstream.received) == 1
    stats = daemon.app.stats()["cache"]
    assert isinstance(stats, dict)
    assert (stats["hits"], stats["misses"], stats["backend"]) == (1, 1, "memory")


async def test_revalidation_304_refreshes_the_entry(nursery: trio.Nursery) -> None:
    upstream, daemon = await start(nursery)
    upstream.script(
        cacheable(b"v1", "max-age=0", ("etag", '"v1"')),
        Reply(status=304, headers=(("cache-control", "max-age=60"), ("etag", '"v1"')), body=b""),
    )
    await http_request(daemon.port, "GET", "/v1/a")
    revalidated = await http_request(daemon.port, "GET", "/v1/a")
    hit = await http_request(daemon.port, "GET", "/v1/a")
    assert (revalidated.status, revalidated.body) == (200, b"v1")
    assert upstream.received[1].header("if-none-match") == '"v1"'
    assert "fwd-status=304" in (revalidated.header("cache-status") or "")
    assert (hit.header("cache-status") or "").startswith("resilient-ambassador; hit")
    assert len(upstream.received) == 2


async def test_stale_while_revalidate_refreshes_once_in_the_background(nursery: trio.Nursery) -> None:
    upstream, daemon = await start(nursery)
    upstream.script(
        cacheable(b"old", "max-age=1, stale-while-revalidate=60", ("age", "5")),
        cacheable(b"new", "max-age=60", delay_s=0.2),
    )
    await http_request(daemon.port, "GET", "/v1/a")
    stale = [await http_request(daemon.port, "GET", "/v1/a") for _ in range(3)]
    assert [r.body for r in stale] == [b"old"] * 3
    await upstream.wait_received(2)
    for _ in range(250):  # the refresh lands in the store just after the upstream answers
        if daemon.app.cache_stats.stored >= 2:
            break
        await trio.sleep(0.02)
    assert (await http_request(daemon.port, "GET", "/v1/a")).body == b"new"
    assert len(upstream.received) == 2


async def test_stale_if_error_when_the_upstream_is_down(nursery: trio.Nursery) -> None:
    upstream, daemon = await start(nursery)
    upstream.script(cacheable(b"good", "max-age=1, stale-if-error=600", ("age", "5")))
    await http_request(daemon.port, "GET", "/v1/a")
    await upstream.stop()  # the port now refuses connections
    response = await http_request(daemon.port, "GET", "/v1/a")
    assert (response.status, response.body) == (200, b"good")
    assert "detail=stale-if-error" in (response.header("cache-status") or "")
    assert len(upstream.received) == 1
    assert daemon.app.pools["up"].connections_opened == 1  # one failed connect, no retry


async def test_stale_if_error_on_an_open_breaker_with_zero_upstream_calls(nursery: trio.Nursery) -> None:
    breaker = BreakerConfig(failure_threshold=2, min_requests=0, reset_timeout_s=60.0)
    upstream, daemon = await start(nursery, breaker=breaker)
    upstream.script(cacheable(b"good", "max-age=1, stale-if-error=600", ("age", "5")))
    await http_request(daemon.port, "GET", "/v1/cached")
    upstream.script(Reply(status=503), Reply(status=503))
    for _ in range(2):
        await http_request(daemon.port, "GET", "/v1/other")
    before = len(upstream.received)
    response = await http_request(daemon.port, "GET", "/v1/cached")
    assert (response.status, response.body) == (200, b"good")
    assert len(upstream.received) == before  # the breaker refused; the cache answered
    assert (await http_request(daemon.port, "GET", "/v1/other")).status == 503  # nothing cached


async def test_concurrent_misses_make_one_upstream_request(nursery: trio.Nursery) -> None:
    upstream, daemon = await start(nursery)
    upstream.script(cacheable(b"shared", delay_s=0.3))
    bodies: list[bytes] = []

    async def one() -> None:
        bodies.append((await http_request(daemon.port, "GET", "/v1/a")).body)

    async with trio.open_nursery() as clients:
        for _ in range(8):
            clients.start_soon(one)
    assert bodies == [b"shared"] * 8
    assert len(upstream.received) == 1


async def test_vary_unsafe_invalidation_and_head(nursery: trio.Nursery) -> None:
    upstream, daemon = await start(nursery)
    upstream.default = cacheable(b"body", "max-age=60", ("vary", "Accept-Language"))
    port = daemon.port
    await http_request(port, "GET", "/v1/a", [("accept-language", "en")])
    assert (await http_request(port, "GET", "/v1/a", [("accept-language", "en")])).header("age") is not None
    await http_request(port, "GET", "/v1/a", [("accept-language", "fr")])  # vary-miss
    assert len(upstream.received) == 2
    head = await http_request(port, "HEAD", "/v1/a", [("accept-language", "fr")])
    assert (head.status, head.body, head.header("content-length")) == (200, b"", "4")
    assert len(upstream.received) == 2  # HEAD from the stored GET
    upstream.script(Reply(status=204, body=b""))
    await http_request(port, "POST", "/v1/a", body=b"x")
    await http_request(port, "GET", "/v1/a", [("accept-language", "fr")])
    assert len(upstream.received) == 4  # the POST, then a miss: the URL was invalidated


async def test_set_cookie_responses_are_not_stored(nursery: trio.Nursery) -> None:
    upstream, daemon = await start(nursery)
    upstream.default = cacheable(b"mine", "max-age=60", ("set-cookie", "session=abc"))
    first = await http_request(daemon.port, "GET", "/v1/me")
    second = await http_request(daemon.port, "GET", "/v1/me")
    assert "detail=set-cookie" in (first.header("cache-status") or "")
    assert second.header("age") is None
    assert len(upstream.received) == 2


async def test_cache_poisoning_rows(nursery: trio.Nursery) -> None:
    """HARDENING.md: primed override headers, path confusion and uncacheable look-alikes."""
    upstream, daemon = await start(nursery)

    def reflecting(received: Received) -> Reply:
        # An upstream (framework) that acts on whatever override headers reach it.
        evil = any(value == b"evil" for _, value in received.headers)
        return cacheable(b"evil" if evil else b"plain")

    upstream.default = reflecting
    port = daemon.port
    for name in ("Host", "X-Forwarded-Host", "X-Original-URL", "X-Rewrite-URL", "X-HTTP-Method-Override"):
        await http_request(port, "GET", f"/v1/p-{name}", [(name, "evil")])
        plain = await http_request(port, "GET", f"/v1/p-{name}")
        assert plain.body == b"plain", name
    # An upstream that does not mark it cacheable: never stored, whatever the extension.
    upstream.default = Reply(body=b"me")
    for path in ("/v1/me/x.css", "/v1/me;x.css", "/v1/me%2Fx.css"):
        await http_request(port, "GET", path)
        assert (await http_request(port, "GET", path)).header("age") is None
    # The key is built from the normalised path that is forwarded.
    upstream.default = cacheable(b"b")
    await http_request(port, "GET", "/v1/b")
    assert (await http_request(port, "GET", "/v1/x/../b")).header("age") is not None


async def test_admin_purge_by_url_and_prefix(nursery: trio.Nursery) -> None:
    upstream, daemon = await start(nursery)
    upstream.default = cacheable(b"x")
    for path in ("/v1/a", "/v1/b?q=1", "/v2/c"):
        await http_request(daemon.port, "GET", path)
    one = await http_request(daemon.admin_port, "POST", "/cache/purge?url=%2Fv1%2Fb%3Fq%3D1")
    assert (one.status, json.loads(one.body)) == (200, {"purged": 1})
    many = await http_request(daemon.admin_port, "POST", "/cache/purge", body=b'{"prefix": "/v1/"}')
    assert json.loads(many.body) == {"purged": 1}
    bad = await http_request(daemon.admin_port, "POST", "/cache/purge?url=nope")
    assert bad.status == 400
    before = len(upstream.received)
    for path in ("/v1/a", "/v1/b?q=1", "/v2/c"):
        await http_request(daemon.admin_port and daemon.port, "GET", path)
    assert len(upstream.received) == before + 2  # /v2/c is still cached


def _redis_config(config: Config, url: str, prefix: str) -> Config:
    return dataclasses.replace(
        config, redis=RedisConfig(url=url, key_prefix=prefix), cache=CacheStoreConfig(backend="redis")
    )


async def test_two_daemons_share_redis_entries_but_not_across_credentials(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)

    def echoing(received: Received) -> Reply:
        # A careless upstream that echoes the credential in a header: never stored or sent.
        return cacheable(b"shared", "max-age=60", ("x-echo", received.header("x-api-key") or ""))

    upstream.default = echoing
    canary = "canary-" + secrets.token_hex(8)
    prefix = f"test:{secrets.token_hex(6)}:"
    with redis_server() as redis:
        headers = (("x-api-key", parse_template("${API_KEY}")),)
        config = _redis_config(cache_config(upstream, headers=headers), redis.url, prefix)

        def key(value: str) -> SecretResolver:
            return SecretResolver(environ={"API_KEY": value})

        first = await start_daemon(nursery, config, key(canary))
        second = await start_daemon(nursery, config, key(canary))
        other = await start_daemon(nursery, config, key(canary + "-other"))
        # Every pod's app calls its own sidecar by the same name, so the Host matches.
        host = [("host", "localhost:8000")]
        await http_request(first.port, "GET", "/v1/a", host)
        await first.app.cache_store.flush()  # type: ignore[union-attr]
        from_second = await http_request(second.port, "GET", "/v1/a", host)
        from_other = await http_request(other.port, "GET", "/v1/a", host)
        assert (from_second.header("cache-status") or "").startswith("resilient-ambassador; hit")
        assert "fwd=uri-miss" in (from_other.header("cache-status") or "")
        assert len(upstream.received) == 2
        assert from_second.header("x-echo") is None
        await other.app.cache_store.flush()  # type: ignore[union-attr]
        # Entries (prefix + "c:{" + hash + "}", two: one per credential), their URL sets, the index.
        assert SecretScan(canary, canary + "-other").redis_keys(redis.url, prefix) >= 4
        entry_key_length = len(prefix) + len("c:{}") + 32
        entries = [
            k for k in redis.command("KEYS", prefix + "c:*").split(b"\r\n") if len(k) == entry_key_length
        ]
        assert len(entries) >= 2  # entries stored as prefix + "c:{" + hash + "}"
        for entry in entries:
            assert b"shared" in redis.command("GET", entry.decode())
        for daemon in (first, second, other):
            daemon.app.stop_now()


async def test_redis_down_bypasses_the_cache_and_traffic_flows(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    upstream.default = cacheable(b"ok")
    with redis_server() as redis:
        config = _redis_config(cache_config(upstream), redis.url, "t:")
        daemon = await start_daemon(nursery, config)
        redis.kill()
        with trio.fail_after(5):
            statuses = [(await http_request(daemon.port, "GET", f"/v1/{i}")).status for i in range(5)]
        assert statuses == [200] * 5
        stats = daemon.app.stats()["cache"]
        assert isinstance(stats, dict)
        store = stats["store"]
        assert isinstance(store, dict)
        assert store["redis_fallbacks"] >= 1  # type: ignore[operator]
        assert stats["redis_healthy"] is False
        daemon.app.stop_now()


async def test_keep_alive_client_sees_hits_on_one_connection(nursery: trio.Nursery) -> None:
    upstream, daemon = await start(nursery)
    upstream.default = cacheable(b"k")
    async with await HttpClient.connect(daemon.port) as client:
        bodies = [(await client.request("GET", "/v1/k")).body for _ in range(3)]
    assert bodies == [b"k"] * 3
    assert len(upstream.received) == 1


async def test_concurrent_misses_on_two_daemons_make_one_upstream_request(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    upstream.default = cacheable(b"once", delay_s=0.3)
    with redis_server() as redis:
        config = _redis_config(cache_config(upstream), redis.url, "t:")
        daemons = [await start_daemon(nursery, config) for _ in range(2)]
        bodies: list[bytes] = []

        async def one(daemon: RunningDaemon) -> None:
            response = await http_request(daemon.port, "GET", "/v1/a", [("host", "localhost:8000")])
            bodies.append(response.body)

        async with trio.open_nursery() as clients:
            for i in range(6):
                clients.start_soon(one, daemons[i % 2])
        assert bodies == [b"once"] * 6
        assert len(upstream.received) == 1  # the other pod waited on the Redis lease
        for daemon in daemons:
            daemon.app.stop_now()


async def test_purge_answers_when_the_cache_is_off_or_the_request_is_wrong(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    off = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    assert (await http_request(off.admin_port, "POST", "/cache/purge?url=/a")).status == 404
    _, on = await start(nursery)
    port = on.admin_port
    assert (await http_request(port, "POST", "/cache/purge", body=b"[1]")).status == 400
    assert (
        await http_request(port, "POST", "/cache/purge", body=b'{"url": "/a", "prefix": "/"}')
    ).status == 400
    assert (await http_request(port, "POST", "/cache/purge", body=b"x" * 9000)).status == 413
    assert (await http_request(port, "GET", "/cache/purge?url=/a")).status == 404


async def test_head_first_and_range_requests_never_store_partial_bodies(nursery: trio.Nursery) -> None:
    upstream, daemon = await start(nursery)
    upstream.default = cacheable(b"full body")
    head = await http_request(daemon.port, "HEAD", "/v1/h")
    get = await http_request(daemon.port, "GET", "/v1/h")
    assert (head.body, get.body) == (b"", b"full body")  # the HEAD stored nothing for the GET
    upstream.script(
        Reply(
            status=206,
            headers=(("content-range", "bytes 0-3/9"), ("cache-control", "max-age=60")),
            body=b"full",
        )
    )
    partial = await http_request(daemon.port, "GET", "/v1/r", [("range", "bytes=0-3")])
    whole = await http_request(daemon.port, "GET", "/v1/r")
    assert (partial.status, partial.header("cache-status")) == (206, "resilient-ambassador; fwd=request")
    assert (whole.status, whole.body) == (200, b"full body")
    assert len(upstream.received) == 4


async def test_a_failure_with_a_stale_fallback_is_not_retried(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    retry = dataclasses.replace(NO_RETRY, retries=2, backoff_base_s=0.001, backoff_max_s=0.002)
    route = RouteConfig(upstream="up", name="api", cache=CACHE, retry=retry)
    daemon = await start_daemon(nursery, cache_config(upstream, route=route))
    upstream.script(
        cacheable(b"good", "max-age=1, stale-if-error=600", ("age", "5")),
        cacheable(b"strict", "max-age=1, must-revalidate", ("age", "5")),
    )
    upstream.default = Reply(status=503)
    await http_request(daemon.port, "GET", "/v1/covered")
    await http_request(daemon.port, "GET", "/v1/strict")
    covered = await http_request(daemon.port, "GET", "/v1/covered")
    assert (covered.status, covered.body) == (200, b"good")
    assert len(upstream.received) == 3  # one revalidation, not retried: the stale copy answers
    strict = await http_request(daemon.port, "GET", "/v1/strict")
    assert strict.status == 503
    assert len(upstream.received) == 6  # no stale cover: the retries run as usual
