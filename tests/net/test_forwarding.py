"""End to end over loopback: client -> daemon -> scriptable h11 upstream."""

from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path

import trio

from resilient_ambassador.core.config import ClientLimits, RouteConfig
from resilient_ambassador.core.templates import Template, TemplatePart, parse_template
from resilient_ambassador.secrets import SecretResolver
from tests.support.client import HttpClient, RawConnection, http_request, parse_responses, raw_exchange
from tests.support.daemon import simple_config, start_daemon, upstream_config
from tests.support.upstream import Reply, echo, parse_echo, start_fake_upstream

SECRET = "s3cr3t-canary-7f1d"


def env_template(var: str) -> Template:
    return Template(parts=(TemplatePart("env", var),), source=f"${{{var}}}")


async def test_get_is_forwarded_with_proxy_headers(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))

    response = await http_request(
        daemon.port,
        "GET",
        "/things?id=1",
        headers=[
            ("Connection", "keep-alive, X-Drop-Me"),
            ("X-Drop-Me", "gone"),
            ("Keep-Alive", "timeout=5"),
            ("X-Forwarded-For", "10.0.0.9"),
            ("X_Sneaky", "underscore"),
            ("Accept", "application/json"),
        ],
    )

    assert response.status == 200
    seen = upstream.received[0]
    assert seen.method == b"GET"
    assert seen.target == b"/things?id=1"
    assert seen.header("host") == f"127.0.0.1:{upstream.port}"
    assert seen.header("x-forwarded-for") == "10.0.0.9, 127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == f"127.0.0.1:{daemon.port}"
    assert re.fullmatch(r"1\.1 resilient-ambassador \([0-9a-f]{8}\)", seen.header("via") or "")
    assert seen.header("accept") == "application/json"
    for hop in ("connection", "x-drop-me", "keep-alive", "x_sneaky"):
        assert seen.header(hop) is None, hop


async def test_keepalive_reuses_one_upstream_connection(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))

    async with await HttpClient.connect(daemon.port) as client:
        for _ in range(5):
            assert (await client.request("GET", "/")).body == b"ok"
        assert client.reusable

    assert upstream.connections_accepted == 1
    assert [r.connection_id for r in upstream.received] == [0] * 5


async def test_request_bodies_stream_both_framings(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))

    async with await HttpClient.connect(daemon.port) as client:
        fixed = await client.request("POST", "/a", body=b"x" * 100_000)
        chunked = await client.request("PUT", "/b", body=[b"one,", b"two,", b"three"])

    assert parse_echo(fixed.body)["body"] == "x" * 100_000
    assert upstream.received[0].header("content-length") == "100000"
    assert parse_echo(chunked.body)["body"] == "one,two,three"
    assert upstream.received[1].header("transfer-encoding") == "chunked"


async def test_chunked_and_bodiless_responses(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    upstream.script(
        Reply(body=[b"a" * 10, b"b" * 70_000, b"c"]),
        Reply(status=204, body=b""),
        Reply(status=304, body=b"", headers=[("etag", '"v1"')]),
        Reply(headers=[("content-length", "5")], body=b""),
    )

    async with await HttpClient.connect(daemon.port) as client:
        streamed = await client.request("GET", "/big")
        no_content = await client.request("DELETE", "/x")
        not_modified = await client.request("GET", "/x", headers=[("If-None-Match", '"v1"')])
        head = await client.request("HEAD", "/x")
        assert client.reusable

    assert streamed.body == b"a" * 10 + b"b" * 70_000 + b"c"
    assert streamed.header("transfer-encoding") == "chunked"
    assert (no_content.status, no_content.body) == (204, b"")
    assert (not_modified.status, not_modified.header("etag")) == (304, '"v1"')
    assert (head.status, head.body, head.header("content-length")) == (200, b"", "5")


async def test_expect_100_continue(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    limits_route = RouteConfig(upstream="up", max_request_body_bytes=1000)
    daemon = await start_daemon(
        nursery, simple_config(upstream_config(upstream.url()), routes=[limits_route])
    )

    ok = await http_request(daemon.port, "POST", "/", headers=[("Expect", "100-continue")], body=b"hello")
    assert ok.informational == [100]
    assert parse_echo(ok.body)["body"] == "hello"
    assert upstream.received[0].header("expect") is None

    # Over the limit: 413 before any 100 Continue, and the body is never read.
    raw = await raw_exchange(
        daemon.port,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in raw
    assert len(upstream.received) == 1


async def test_body_over_route_limit_is_413(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    route = RouteConfig(upstream="up", max_request_body_bytes=1000)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), routes=[route]))

    declared = await raw_exchange(daemon.port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n")
    chunked = await raw_exchange(
        daemon.port,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3e8\r\n"
        + b"x" * 1000
        + b"\r\n"
        + b"10\r\n"
        + b"y" * 16
        + b"\r\n0\r\n\r\n",
    )

    assert declared.startswith(b"HTTP/1.1 413 ")
    assert chunked.startswith(b"HTTP/1.1 413 ")
    assert all(r.complete is False for r in upstream.received)  # the upstream never got a whole body


async def test_injected_credential_replaces_client_copy_and_never_leaks(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    secrets = SecretResolver(environ={"API_KEY": SECRET})
    config = simple_config(
        upstream_config(
            upstream.url(),
            headers=(("X-Api-Key", env_template("API_KEY")),),
            query=(("api_key", env_template("API_KEY")),),
        )
    )
    for _, template in config.upstreams["up"].headers:
        secrets.check(template)
    daemon = await start_daemon(nursery, config, secrets)
    upstream.script(Reply(headers=[("x-echo-key", SECRET), ("content-type", "text/plain")], body=b"ok"))

    leaky = await http_request(daemon.port, "GET", "/")
    sneaky = await http_request(
        daemon.port,
        "GET",
        "/x?api_key=mine&q=1",
        headers=[("X-Api-Key", "client-value"), ("Connection", "X-Api-Key")],
    )

    assert leaky.header("x-echo-key") is None  # a header echoing the secret is dropped
    seen = upstream.received[1]
    assert seen.header_values("x-api-key") == [SECRET]
    assert seen.target == f"/x?q=1&api_key={SECRET}".encode()
    # The echo body is the upstream's own business; the daemon added nothing secret itself.
    assert SECRET.encode() not in b"".join(v for _, v in sneaky.headers)


async def test_routes_by_host_and_prefix_with_rewrite(nursery: trio.Nursery) -> None:
    movies = await start_fake_upstream(nursery, default=echo)
    other = await start_fake_upstream(nursery, default=echo)
    config = simple_config(
        upstream_config(movies.url() + "/3", name="movies"),
        extra_upstreams=[upstream_config(other.url(), name="other")],
        routes=[
            RouteConfig(upstream="other"),
            RouteConfig(upstream="movies", prefix="/movies", rewrite_prefix="/discover/movie"),
            RouteConfig(upstream="other", prefix="/movies", host="admin.local"),
        ],
    )
    daemon = await start_daemon(nursery, config)

    await http_request(daemon.port, "GET", "/movies?page=2")
    await http_request(daemon.port, "GET", "/moviesx")
    await http_request(daemon.port, "GET", "/movies/../admin")
    await http_request(daemon.port, "GET", "/movies", headers=[("Host", "admin.local:8080")])

    assert [r.target for r in movies.received] == [b"/3/discover/movie?page=2"]
    assert [r.target for r in other.received] == [b"/moviesx", b"/admin", b"/movies"]


async def test_no_route_is_404_json(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    route = RouteConfig(upstream="up", prefix="/api")
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), routes=[route]))

    response = await http_request(daemon.port, "GET", "/elsewhere")

    assert response.status == 404
    assert response.header("x-ambassador-error") == "no_route"
    assert b'"error":"no_route"' in response.body
    assert upstream.connections_accepted == 0


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))

    raw = await raw_exchange(
        daemon.port,
        b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )

    responses, rest = parse_responses(raw)
    assert rest == b""
    assert [parse_echo(r.body)["target"] for r in responses] == ["/one", "/two", "/three"]
    assert parse_echo(responses[0].body)["body"] == "abc"


async def test_requests_per_connection_limit_closes(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    limits = ClientLimits(max_requests_per_connection=2)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), limits=limits))

    async with await HttpClient.connect(daemon.port) as client:
        first = await client.request("GET", "/")
        second = await client.request("GET", "/")
        assert first.header("connection") is None
        assert second.header("connection") == "close"
        assert not client.reusable
        assert await client.read_until_eof() == b""


async def test_stale_pooled_connection_is_replaced(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))

    assert (await http_request(daemon.port, "GET", "/")).status == 200
    assert await upstream.close_idle_connections() == 1
    assert (await http_request(daemon.port, "POST", "/", body=b"once")).status == 200

    assert upstream.connections_accepted == 2
    assert [r.method for r in upstream.received] == [b"GET", b"POST"]


async def test_idempotent_request_replayed_when_reused_connection_dies(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    assert (await http_request(daemon.port, "GET", "/")).status == 200
    # The upstream reads the next request on the pooled connection and closes without a byte.
    upstream.script(Reply(drop="fin"), Reply(body=b"fresh"), Reply(drop="fin"))

    replayed = await http_request(daemon.port, "GET", "/again")
    refused = await http_request(daemon.port, "POST", "/once", body=b"data")

    assert (replayed.status, replayed.body) == (200, b"fresh")
    assert [r.target for r in upstream.received] == [b"/", b"/again", b"/again", b"/once"]
    assert refused.status == 502  # a sent POST is never replayed
    assert refused.header("x-ambassador-error") == "upstream_connection_closed"


async def test_client_disconnect_mid_response_discards_upstream_connection(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    upstream.script(Reply(body=[b"x" * 1000] * 5, chunk_delay_s=0.05))

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await conn.receive_some()).startswith(b"HTTP/1.1 200")

    await upstream.wait_until(lambda: all(c.closed for c in upstream.connections))
    assert (await http_request(daemon.port, "GET", "/")).status == 200
    assert upstream.connections_accepted == 2


async def test_rotated_secret_file_is_used_without_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Kubernetes rotates a mounted Secret by swapping the file: the next request after the
    recheck interval carries the new value."""
    upstream = await start_fake_upstream(nursery, default=echo)
    key_file = tmp_path / "api-key"
    key_file.write_text("old-key\n")
    now = [0.0]
    secrets = SecretResolver(clock=lambda: now[0], recheck_interval_s=1.0)
    template = parse_template(f"Bearer ${{file:{key_file}}}")
    secrets.check(template)
    config = simple_config(upstream_config(upstream.url(), headers=(("Authorization", template),)))
    daemon = await start_daemon(nursery, config, secrets)

    await http_request(daemon.port, "GET", "/")
    replacement = tmp_path / "api-key.new"
    replacement.write_text("new-key\n")
    replacement.replace(key_file)
    await http_request(daemon.port, "GET", "/")  # within the recheck interval: old value
    now[0] = 1.5
    await http_request(daemon.port, "GET", "/")

    assert [r.header("authorization") for r in upstream.received] == [
        "Bearer old-key",
        "Bearer old-key",
        "Bearer new-key",
    ]


async def test_no_route_keeps_the_connection_for_bodiless_requests(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    route = RouteConfig(upstream="up", prefix="/api")
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), routes=[route]))

    async with await HttpClient.connect(daemon.port) as client:
        missing = await client.request("GET", "/nope")
        found = await client.request("GET", "/api/x")

    assert (missing.status, missing.reason) == (404, b"Not Found")
    assert found.status == 200


async def test_options_asterisk_is_forwarded_untouched(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url() + "/base")))

    raw = await raw_exchange(daemon.port, b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")

    assert raw.startswith(b"HTTP/1.1 200 ")
    assert upstream.received[0].target == b"*"


async def test_a_request_looping_back_to_the_daemon_gets_508(nursery: trio.Nursery) -> None:
    # The daemon's upstream is the daemon itself (a misconfiguration, or a Service that
    # points back at the pod): the second pass sees its own Via entry and stops the loop.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = simple_config(upstream_config(f"http://127.0.0.1:{port}"))
    listener = dataclasses.replace(config.listeners[0], port=port)
    daemon = await start_daemon(nursery, dataclasses.replace(config, listeners=(listener,)))

    response = await http_request(daemon.port, "GET", "/")

    assert response.status == 508
    assert response.header("x-ambassador-error") == "loop_detected"
