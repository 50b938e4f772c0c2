"""The "Credentials, hop-by-hop, SSRF" rows of HARDENING.md not pinned elsewhere: the daemon
dials only what its config names, whatever the request says, and the credentials it injects
always arrive, whatever the client puts in `Connection`.

A "bait" listener stands for an internal service (Redis on 6379, a metadata endpoint): each
test asserts it was never connected to.
"""

from __future__ import annotations

import trio

from resilient_ambassador.core.config import RouteConfig
from resilient_ambassador.core.templates import Template, TemplatePart
from resilient_ambassador.secrets import SecretResolver
from tests.support.client import HttpClient, parse_status, raw_exchange
from tests.support.daemon import RunningDaemon, simple_config, start_daemon, upstream_config
from tests.support.upstream import FakeUpstream, Reply, echo, parse_echo, start_fake_upstream

SECRET = "ssrf-canary-41c9"
TOKEN = "Bearer tok-canary-41c9"


def _env(var: str) -> Template:
    return Template(parts=(TemplatePart("env", var),), source=f"${{{var}}}")


async def _bait(nursery: trio.Nursery) -> FakeUpstream:
    return await start_fake_upstream(nursery)


async def _daemon(
    nursery: trio.Nursery, upstream: FakeUpstream, routes: list[RouteConfig] | None = None
) -> RunningDaemon:
    config = simple_config(
        upstream_config(
            upstream.url(), headers=(("X-Api-Key", _env("API_KEY")), ("Authorization", _env("TOKEN")))
        ),
        routes=routes,
    )
    return await start_daemon(nursery, config, SecretResolver(environ={"API_KEY": SECRET, "TOKEN": TOKEN}))


async def test_connection_naming_the_credentials_cannot_strip_the_injected_ones(
    nursery: trio.Nursery,
) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    daemon = await _daemon(nursery, upstream)

    async with await HttpClient.connect(daemon.port) as client:
        response = await client.request(
            "GET",
            "/x",
            headers=[
                ("Connection", "close, X-Api-Key, Authorization, Host, X-Forwarded-For"),
                ("X-Api-Key", "client-copy"),
                ("Authorization", "Bearer client"),
                ("X-Forwarded-For", "6.6.6.6"),
            ],
        )
        assert await client.read_until_eof() == b""  # `close` was honoured

    seen = upstream.received[0]
    assert seen.header_values("x-api-key") == [SECRET]
    assert seen.header_values("authorization") == [TOKEN]
    assert seen.header_values("host") == [f"127.0.0.1:{upstream.port}"]
    assert seen.header_values("x-forwarded-for") == ["127.0.0.1"]  # the client's was named: dropped
    assert seen.header("connection") is None
    assert SECRET.encode() not in b"".join(v for _, v in response.headers)
    assert TOKEN.encode() not in b"".join(v for _, v in response.headers)


async def test_host_naming_an_internal_service_routes_by_config_only(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    bait = await _bait(nursery)
    catch_all = await _daemon(nursery, upstream)
    by_host = await _daemon(nursery, upstream, routes=[RouteConfig(upstream="up", host="api.example")])
    request = f"GET /keys HTTP/1.1\r\nHost: 127.0.0.1:{bait.port}\r\nConnection: close\r\n\r\n".encode()

    forwarded = await raw_exchange(catch_all.port, request)
    unrouted = await raw_exchange(by_host.port, request)

    assert parse_status(forwarded) == 200
    assert parse_echo(forwarded.partition(b"\r\n\r\n")[2])["target"] == "/keys"
    assert upstream.received[0].header("host") == f"127.0.0.1:{upstream.port}"
    assert upstream.received[0].header("x-forwarded-host") == f"127.0.0.1:{bait.port}"
    assert parse_status(unrouted) == 404
    assert b"no_route" in unrouted
    assert len(upstream.received) == 1
    assert bait.connections_accepted == 0


async def test_absolute_form_naming_another_host_never_dials_it(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    bait = await _bait(nursery)
    daemon = await _daemon(nursery, upstream)
    authority = f"127.0.0.1:{bait.port}".encode()

    other_host = await raw_exchange(
        daemon.port, b"GET http://" + authority + b"/latest HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    same_host = await raw_exchange(
        daemon.port,
        b"GET http://"
        + authority
        + b"/latest HTTP/1.1\r\nHost: "
        + authority
        + b"\r\nConnection: close\r\n\r\n",
    )

    assert parse_status(other_host) == 400
    # Absolute form matching Host is origin form (RFC 9112 3.2.2): routed by config, the
    # authority only ever reaches the upstream as X-Forwarded-Host.
    assert parse_status(same_host) == 200
    assert [r.target for r in upstream.received] == [b"/latest"]
    assert bait.connections_accepted == 0


async def test_redirects_are_passed_back_never_followed(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    bait = await _bait(nursery)
    daemon = await _daemon(nursery, upstream)
    location = f"http://127.0.0.1:{bait.port}/steal"
    upstream.script(Reply(status=302, headers=[("location", location)], body=b""))

    async with await HttpClient.connect(daemon.port) as client:
        response = await client.request("GET", "/moved")

    assert (response.status, response.header("location")) == (302, location)
    assert len(upstream.received) == 1
    assert bait.connections_accepted == 0
