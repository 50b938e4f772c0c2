"""Request body framing rows of HARDENING.md not pinned in test_hostile_input: duplicate
lengths, HTTP/1.0 with chunking, a chunk size past any limit, trailer floods, and an upstream
that sends bytes after its body."""

from __future__ import annotations

import trio

from tests.support.client import RawConnection, RawRead, http_request, parse_status
from tests.support.daemon import RunningDaemon, simple_config, start_daemon, upstream_config
from tests.support.upstream import FakeUpstream, Reply, echo, start_fake_upstream

POST = b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"  # so every read ends at EOF
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"


async def _start(nursery: trio.Nursery) -> tuple[FakeUpstream, RunningDaemon]:
    upstream = await start_fake_upstream(nursery, default=echo)
    return upstream, await start_daemon(nursery, simple_config(upstream_config(upstream.url())))


async def _send(daemon: RunningDaemon, data: bytes) -> RawRead:
    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(data)
        return await conn.receive_until_closed(timeout_s=5.0)


async def test_repeated_equal_content_length_is_forwarded_once(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery)

    for lengths in (b"Content-Length: 3\r\nContent-Length: 3\r\n", b"Content-Length: 3, 3\r\n"):
        await _send(daemon, POST + lengths + b"\r\nabc")

    assert [(r.header_values("content-length"), r.body) for r in upstream.received] == [(["3"], b"abc")] * 2


async def test_http10_with_chunked_body_is_handled_then_closed(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery)

    read = await _send(
        daemon, b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )

    assert (parse_status(read.data), read.ending) == (200, "eof")
    assert [r.body for r in upstream.received] == [b"abc"]


async def test_chunk_size_past_the_body_limit_is_413_at_once(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery)

    with trio.fail_after(2):  # not the 60 s body timeout, nor a megabyte streamed first
        read = await _send(daemon, CHUNKED + b"FFFFFFFFFFFFFFED\r\nabc")

    assert parse_status(read.data) == 413
    assert b"\r\nconnection: close\r\n" in read.data.lower()
    await upstream.wait_until(lambda: all(c.closed for c in upstream.connections))
    assert all(r.complete is False and r.body == b"" for r in upstream.received)  # not a byte of it


async def test_chunks_within_the_limit_still_stream(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery)

    read = await _send(daemon, CHUNKED + b"10000\r\n" + b"x" * 0x10000 + b"\r\n0\r\n\r\n")

    assert (parse_status(read.data), read.ending) == (200, "eof")
    assert len(upstream.received[0].body) == 0x10000


async def test_thousands_of_trailer_fields_are_431(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery)
    trailers = b"".join(b"T-%d: v\r\n" % i for i in range(1000))

    read = await _send(daemon, CHUNKED + b"3\r\nabc\r\n0\r\n" + trailers + b"\r\n")

    assert parse_status(read.data) == 431
    assert b"\r\nconnection: close\r\n" in read.data.lower()
    await upstream.wait_until(lambda: all(c.closed for c in upstream.connections))
    assert all(r.complete is False for r in upstream.received)


async def test_a_few_trailers_are_accepted_and_not_forwarded(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery)

    read = await _send(daemon, CHUNKED + b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n")

    assert parse_status(read.data) == 200
    assert b"X-Checksum" not in upstream.received[0].raw


async def test_bytes_after_the_response_body_discard_the_connection(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery)
    upstream.script(Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n"))

    first = await http_request(daemon.port)
    second = await http_request(daemon.port)

    assert (first.status, first.body) == (200, b"ok")
    assert second.status == 200
    assert [r.connection_id for r in upstream.received] == [0, 1]  # never reused: framing in doubt


async def test_a_20_kib_chunk_extension_is_400_and_never_forwarded(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery)

    read = await _send(daemon, CHUNKED + b"3;ext=" + b"e" * 20 * 1024 + b"\r\nabc\r\n0\r\n\r\n")

    assert parse_status(read.data) == 400
    assert b"\r\nconnection: close\r\n" in read.data.lower()
    await upstream.wait_until(lambda: all(c.closed for c in upstream.connections))
    assert all(r.complete is False and r.body == b"" for r in upstream.received)


async def test_an_extension_within_1_kib_is_accepted_and_dropped(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery)

    read = await _send(daemon, CHUNKED + b"3;ext=" + b"e" * 1000 + b"\r\nabc\r\n0\r\n\r\n")

    assert parse_status(read.data) == 200
    assert upstream.received[0].body == b"abc"
    assert b"ext=" not in upstream.received[0].raw
