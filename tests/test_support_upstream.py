"""The test infrastructure itself: the fake upstream and the clients do what they claim."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio

from tests.support.client import (
    HttpClient,
    RawConnection,
    http_request,
    parse_responses,
    parse_status,
    raw_exchange,
)
from tests.support.tls import TLSMaterial, make_tls_material
from tests.support.upstream import FakeUpstream, Reply, echo, parse_echo, start_fake_upstream

GET = b"GET /a HTTP/1.1\r\nHost: up\r\n\r\n"


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    return await start_fake_upstream(nursery)


@pytest.fixture
def tls_material(tmp_path: Path) -> TLSMaterial:
    return make_tls_material(tmp_path)


async def test_keep_alive_reuses_one_connection(upstream: FakeUpstream) -> None:
    upstream.script(Reply(body=b"first"), Reply(status=201, body=b"second"))
    async with await HttpClient.connect(upstream.port) as client:
        first = await client.request(target="/one")
        second = await client.request("POST", "/two", body=b"payload")
        assert client.reusable
    third = await http_request(upstream.port, target="/three")

    assert (first.status, first.body) == (200, b"first")
    assert (second.status, second.body) == (201, b"second")
    assert (third.status, third.body, third.header("content-length")) == (200, b"ok", "2")
    assert [r.target for r in upstream.received] == [b"/one", b"/two", b"/three"]
    assert [r.connection_id for r in upstream.received] == [0, 0, 1]
    assert upstream.connections_accepted == 2
    assert upstream.received[1].body == b"payload"
    assert upstream.received[1].header("Content-Length") == "7"
    assert upstream.scripted_left == 0


async def test_records_exact_raw_bytes_of_each_pipelined_request(upstream: FakeUpstream) -> None:
    second = b"POST /b HTTP/1.1\r\nHost: up\r\nContent-Length: 3\r\n\r\nxyz"
    third = b"GET /c HTTP/1.1\r\nHost: up\r\nConnection: close\r\n\r\n"
    raw = await raw_exchange(upstream.port, [GET + second[:20], second[20:] + third])

    responses, rest = parse_responses(raw)
    assert [r.status for r in responses] == [200, 200, 200]
    assert rest == b""
    assert [r.raw for r in upstream.received] == [GET, second, third]
    assert bytes(upstream.connections[0].raw) == GET + second + third
    assert upstream.connections[0].closed


async def test_chunked_bodies_both_ways(upstream: FakeUpstream) -> None:
    upstream.script(Reply(body=[b"one-", b"two-", b"three"]))
    response = await http_request(upstream.port, "PUT", body=[b"abc", b"defg"])

    assert response.body == b"one-two-three"
    assert response.header("transfer-encoding") == "chunked"
    assert response.header("content-length") is None
    seen = upstream.received[0]
    assert seen.body == b"abcdefg"
    assert seen.header("transfer-encoding") == "chunked"
    assert seen.raw.endswith(b"\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")


async def test_chunk_delay_splits_writes_and_empty_first_chunk_sends_head_alone(
    upstream: FakeUpstream,
) -> None:
    upstream.script(Reply(body=[b"", b"much later"], chunk_delay_s=30.0))
    async with await RawConnection.connect(upstream.port) as conn:
        await conn.send(GET)
        head = await conn.receive_some()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.lower().endswith(b"transfer-encoding: chunked\r\n\r\n")


async def test_echo_handler_returns_the_request(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    response = await http_request(
        upstream.port, "POST", "/p?q=1", headers=[("X-Thing", "v")], body=b"\xff\x00"
    )

    doc = parse_echo(response.body)
    assert response.header("content-type") == "application/json"
    assert (doc["method"], doc["target"], doc["body"]) == ("POST", "/p?q=1", "\xff\x00")
    assert ["x-thing", "v"] in doc["headers"]
    assert doc["connection_id"] == 0


async def test_raw_reply_reaches_raw_client_verbatim(upstream: FakeUpstream) -> None:
    garbage = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nzzz"
    upstream.script(Reply(raw=garbage, close_after=True))

    assert await raw_exchange(upstream.port, GET) == garbage
    assert [r.raw for r in upstream.received] == [GET]


async def test_raw_reply_then_keep_alive_continues(upstream: FakeUpstream) -> None:
    upstream.script(Reply(raw=b"HTTP/1.1 204 No Content\r\n\r\n"))
    raw = await raw_exchange(upstream.port, GET + GET.replace(b"/a", b"/b"), half_close=True)

    responses, rest = parse_responses(raw)
    assert [r.status for r in responses] == [204, 200]
    assert rest == b""
    assert [r.target for r in upstream.received] == [b"/a", b"/b"]


async def test_reset_after_head_sends_head_then_rst(upstream: FakeUpstream) -> None:
    upstream.script(Reply(body=b"0123456789", reset_after_head=True))
    async with await RawConnection.connect(upstream.port) as conn:
        await conn.send(GET)
        result = await conn.receive_until_closed()

    assert result.ending == "reset"
    assert result.data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert result.data.endswith(b"\r\n\r\n01234")
    assert b"content-length: 10\r\n" in result.data


@pytest.mark.parametrize(("mode", "ending"), [("fin", "eof"), ("rst", "reset")])
async def test_drop_closes_without_answering(upstream: FakeUpstream, mode: str, ending: str) -> None:
    upstream.script(Reply(drop="fin" if mode == "fin" else "rst"))
    async with await RawConnection.connect(upstream.port) as conn:
        await conn.send(GET)
        result = await conn.receive_until_closed()

    assert (result.data, result.ending) == (b"", ending)
    assert len(upstream.received) == 1


async def test_close_after_sends_connection_close_and_closes(upstream: FakeUpstream) -> None:
    upstream.script(Reply(close_after=True))
    async with await HttpClient.connect(upstream.port) as client:
        response = await client.request()
        assert response.header("connection") == "close"
        assert not client.reusable
        assert await client.read_until_eof() == b""


async def test_close_idle_connections_closes_only_idle_ones(upstream: FakeUpstream) -> None:
    upstream.script(Reply(delay_s=30.0))  # keeps the first request's connection busy
    async with trio.open_nursery() as nursery:
        nursery.start_soon(http_request, upstream.port)
        await upstream.wait_received(1)
        async with await HttpClient.connect(upstream.port) as client:
            await client.request()
            # No waiting: the connection counts as idle once the response has been read.
            assert await upstream.close_idle_connections() == 1
            assert await client.read_until_eof() == b""
        assert [c.closed for c in upstream.connections] == [False, True]
        nursery.cancel_scope.cancel()


async def test_close_idle_connections_with_reset(upstream: FakeUpstream) -> None:
    async with await RawConnection.connect(upstream.port) as conn:
        await conn.send(GET)
        await upstream.wait_until(lambda: upstream.connections[0].idle and upstream.received != [])
        assert await upstream.close_idle_connections(reset=True) == 1
        result = await conn.receive_until_closed()
    assert result.ending == "reset"
    assert parse_status(result.data) == 200


async def test_expect_100_continue_is_answered_before_the_body(upstream: FakeUpstream) -> None:
    head = b"POST /u HTTP/1.1\r\nHost: up\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    async with await RawConnection.connect(upstream.port) as conn:
        await conn.send(head)
        assert await conn.receive_some() == b"HTTP/1.1 100 Continue\r\n\r\n"
        await conn.send(b"body")
        await conn.half_close()
        responses, rest = parse_responses((await conn.receive_until_closed()).data)
    assert ([r.status for r in responses], rest) == ([200], b"")
    assert upstream.received[0].body == b"body"


async def test_http_client_waits_for_100_continue(upstream: FakeUpstream) -> None:
    response = await http_request(upstream.port, "PUT", headers=[("Expect", "100-continue")], body=b"payload")
    assert (response.status, response.informational) == (200, [100])
    assert upstream.received[0].body == b"payload"


async def test_head_gets_headers_without_body(upstream: FakeUpstream) -> None:
    upstream.script(Reply(body=b"twelve bytes"))
    raw = await raw_exchange(upstream.port, b"HEAD / HTTP/1.1\r\nHost: up\r\n\r\n", half_close=True)
    responses, rest = parse_responses(raw, request_methods=["HEAD"])
    assert rest == b""
    assert responses[0].header("content-length") == "12"
    assert responses[0].body == b""


async def test_malformed_request_gets_400_and_is_not_recorded(upstream: FakeUpstream) -> None:
    raw = await raw_exchange(upstream.port, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")

    assert parse_status(raw) == 400
    assert upstream.received == []
    assert upstream.connections[0].error is not None
    assert upstream.connections[0].closed


async def test_truncated_body_is_recorded_as_incomplete(upstream: FakeUpstream) -> None:
    head = b"POST / HTTP/1.1\r\nHost: up\r\nContent-Length: 10\r\n\r\n"
    await raw_exchange(upstream.port, head + b"abc", half_close=True)
    await upstream.wait_until(lambda: upstream.connections[0].closed)

    [seen] = upstream.received
    assert (seen.complete, seen.body, seen.raw) == (False, b"abc", head + b"abc")
    assert upstream.connections[0].requests == 0


async def test_stop_refuses_new_connections(upstream: FakeUpstream) -> None:
    await upstream.stop()
    with pytest.raises(OSError, match="all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", upstream.port)


async def test_tls_with_trustme_ca(nursery: trio.Nursery, tls_material: TLSMaterial) -> None:
    upstream = await start_fake_upstream(nursery, tls=tls_material.server_context())
    assert upstream.url() == f"https://localhost:{upstream.port}"
    assert tls_material.ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")

    for host in ("localhost", "127.0.0.1"):
        async with await HttpClient.connect(
            upstream.port,
            "127.0.0.1",
            ssl_context=tls_material.client_context(),
            server_hostname=host,
        ) as client:
            assert (await client.request()).body == b"ok"
            assert (await client.request()).body == b"ok"
    assert [r.connection_id for r in upstream.received] == [0, 0, 1, 1]


@pytest.mark.parametrize("cert", ["wrong_name", "untrusted"])
async def test_tls_verification_failures(nursery: trio.Nursery, tls_material: TLSMaterial, cert: str) -> None:
    context = tls_material.server_context(cert="wrong_name" if cert == "wrong_name" else "untrusted")
    upstream = await start_fake_upstream(nursery, tls=context)

    with pytest.raises(trio.BrokenResourceError) as info:
        await HttpClient.connect(
            upstream.port,
            "127.0.0.1",
            ssl_context=tls_material.client_context(),
            server_hostname="localhost",
        )
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    await upstream.wait_until(lambda: upstream.connections[0].closed)
    assert upstream.connections[0].error is not None
    assert upstream.received == []


async def test_mtls_requires_client_cert(nursery: trio.Nursery, tls_material: TLSMaterial) -> None:
    upstream = await start_fake_upstream(nursery, tls=tls_material.server_context(require_client_cert=True))
    async with await HttpClient.connect(
        upstream.port,
        "localhost",
        ssl_context=tls_material.client_context(with_client_cert=True),
    ) as client:
        assert (await client.request()).status == 200

    # TLS 1.3: the client's handshake completes before the server checks; the refusal shows
    # up on the first read.
    with pytest.raises(trio.BrokenResourceError):
        async with await HttpClient.connect(
            upstream.port, "localhost", ssl_context=tls_material.client_context()
        ) as client:
            await client.request()
    assert upstream.connections[1].error is not None
    assert len(upstream.received) == 1
    assert tls_material.client_cert_file.exists()
    assert tls_material.client_key_file.exists()


def test_parse_status_and_responses() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 404 Not Found\r\n\r\n"
    assert parse_status(raw) == 200
    responses, rest = parse_responses(raw)
    assert [(r.status, r.body) for r in responses] == [(200, b"hi"), (404, b"")]
    assert rest == b""
    responses, rest = parse_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nnonsense")
    assert (len(responses), rest) == (1, b"nonsense")
    with pytest.raises(ValueError, match="no status line"):
        parse_status(b"nonsense")
