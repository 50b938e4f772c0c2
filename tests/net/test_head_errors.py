"""The daemon's own answers to HEAD requests carry no content (RFC 9110 9.3.2). Found by
test_fuzz: a JSON error body after a HEAD made h11 refuse the write, so the client got no
answer at all, only an aborted connection."""

from __future__ import annotations

import socket

import pytest
import trio

from resilient_ambassador.core.config import RouteConfig
from tests.support.client import HttpClient, RawConnection, parse_responses, parse_status
from tests.support.daemon import simple_config, start_daemon, upstream_config
from tests.support.upstream import start_fake_upstream


def _refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_upstream_error_to_head_is_bodiless_and_keeps_the_connection(nursery: trio.Nursery) -> None:
    daemon = await start_daemon(
        nursery, simple_config(upstream_config(f"http://127.0.0.1:{_refused_port()}"))
    )

    async with await HttpClient.connect(daemon.port) as client:
        head = await client.request("HEAD", "/")
        get = await client.request("GET", "/")  # the same connection: nothing was left unread

    assert (head.status, head.body, head.header("x-ambassador-error")) == (
        502,
        b"",
        "upstream_connect_failed",
    )
    assert head.header("content-length") == get.header("content-length")  # what a GET would get
    assert (get.status, get.header("x-ambassador-error")) == (502, "upstream_connect_failed")
    assert get.body


async def test_no_route_for_head_is_bodiless(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    routes = [RouteConfig(upstream="up", prefix="/api")]
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), routes=routes))

    async with await HttpClient.connect(daemon.port) as client:
        head = await client.request("HEAD", "/elsewhere")
        assert client.reusable

    assert (head.status, head.body) == (404, b"")
    assert upstream.connections_accepted == 0


@pytest.mark.parametrize(
    "head",
    [
        b"HEAD / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # rejected by h11
        b"HEAD / HTTP/1.1\r\nHost: a\r\n folded: continuation\r\n\r\n",  # by our raw-head scan
    ],
    ids=["h11", "raw-scan"],
)
async def test_rejected_head_request_gets_a_bodiless_400(nursery: trio.Nursery, head: bytes) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(head)
        read = await conn.receive_until_closed()

    assert parse_status(read.data) == 400
    responses, rest = parse_responses(read.data, request_methods=["HEAD"])
    assert (len(responses), rest) == (1, b"")  # nothing after the head for the client to misread
    assert upstream.connections_accepted == 0
