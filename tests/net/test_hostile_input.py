"""Request framing attacks and limits: the client gets a 4xx and a closed connection, and the
upstream receives nothing at all."""

from __future__ import annotations

import pytest
import trio

from resilient_ambassador.core.config import ClientLimits
from tests.support.client import RawConnection, parse_status, raw_exchange
from tests.support.daemon import RunningDaemon, simple_config, start_daemon, upstream_config
from tests.support.upstream import FakeUpstream, start_fake_upstream

HEAD = b"POST / HTTP/1.1\r\nHost: a\r\n"


async def _start(
    nursery: trio.Nursery, limits: ClientLimits | None = None
) -> tuple[FakeUpstream, RunningDaemon]:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), limits=limits))
    return upstream, daemon


async def _rejected(daemon: RunningDaemon, data: bytes | list[bytes]) -> int:
    """Send the bytes; assert the daemon answered once and closed; return the status."""
    async with await RawConnection.connect(daemon.port) as conn:
        for part in [data] if isinstance(data, bytes) else data:
            await conn.send(part)
        read = await conn.receive_until_closed()
    assert read.ending == "eof", read
    assert read.data.count(b"HTTP/1.1 ") == 1, read.data
    assert b"\r\nconnection: close\r\n" in read.data.lower()
    return parse_status(read.data)


SMUGGLING = {
    "cl-te": (HEAD + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te-cl": (HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    "te-chunked-identity": (HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 501),
    "te-xchunked": (HEAD + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    "te-twice": (HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    "te-space-before-colon": (HEAD + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    "te-gzip": (HEAD + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    "te-obs-fold": (HEAD + b"X-Foo: bar\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "cl-conflict": (HEAD + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    "cl-plus": (HEAD + b"Content-Length: +3\r\n\r\nabc", 400),
    "cl-negative": (HEAD + b"Content-Length: -1\r\n\r\n", 400),
    "cl-hex": (HEAD + b"Content-Length: 0x10\r\n\r\n", 400),
    "cl-25-digits": (HEAD + b"Content-Length: " + b"9" * 25 + b"\r\n\r\n", 400),
    "bare-lf": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "nul-in-header": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    "bare-cr": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    "absolute-form-other-host": (b"GET http://169.254.169.254/latest HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "connect": (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405),
    "http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "http-1.2": (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    "http-0.9": (b"GET /\r\n\r\n", 400),
    "lowercase-method": (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "no-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "tls-client-hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400),
}


@pytest.mark.parametrize(("data", "status"), SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_framing_attacks_are_rejected_and_never_forwarded(
    nursery: trio.Nursery, data: bytes, status: int
) -> None:
    upstream, daemon = await _start(nursery)

    assert await _rejected(daemon, data) == status

    assert all(not c.raw for c in upstream.connections)  # the upstream received nothing
    assert all(r.complete is False for r in upstream.received)


LIMITS = {
    "101-headers": (
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
        431,
    ),
    "9KiB-header": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 9 * 1024 + b"\r\n\r\n", 200),
    "33KiB-headers-one-write": (
        b"GET / HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1100) for i in range(30))
        + b"\r\n",
        431,
    ),
    "9KiB-request-line": (b"GET /" + b"a" * 9 * 1024 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    "9KiB-request-line-incomplete": (b"GET /" + b"a" * 9 * 1024, 414),
}


@pytest.mark.parametrize(("data", "status"), LIMITS.values(), ids=LIMITS.keys())
async def test_head_limits(nursery: trio.Nursery, data: bytes, status: int) -> None:
    upstream, daemon = await _start(nursery)

    if status == 200:
        raw = await raw_exchange(daemon.port, data, read_timeout_s=1.0)
        assert parse_status(raw) == 200
        return
    assert await _rejected(daemon, data) == status
    assert upstream.connections_accepted == 0


async def test_headers_byte_by_byte_hit_the_same_limit(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery, ClientLimits(max_header_bytes=2048))
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 4096 + b"\r\n\r\n"

    async with await RawConnection.connect(daemon.port) as conn:
        for i in range(0, len(data), 64):
            await conn.send(data[i : i + 64])
        read = await conn.receive_until_closed()
    assert parse_status(read.data) == 431
    assert upstream.connections_accepted == 0


async def test_bad_chunk_mid_body_is_400_and_upstream_request_aborted(nursery: trio.Nursery) -> None:
    """The body is streamed, so the upstream has seen the head by the time a chunk turns out
    malformed: it must get a truncated request on a connection that is then closed, never a
    complete one (and never a reused connection)."""
    upstream, daemon = await _start(nursery)

    status = await _rejected(daemon, HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n")

    assert status == 400
    await upstream.wait_until(lambda: all(c.closed for c in upstream.connections))
    assert all(r.complete is False for r in upstream.received)


async def test_slow_headers_get_408(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery, ClientLimits(header_read_timeout_s=0.2))

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n")  # and then nothing more
        read = await conn.receive_until_closed(timeout_s=5.0)
    assert read.ending == "eof"
    assert parse_status(read.data) == 408
    assert upstream.connections_accepted == 0


async def test_slow_body_gets_408_and_upstream_connection_is_dropped(nursery: trio.Nursery) -> None:
    upstream, daemon = await _start(nursery, ClientLimits(body_read_timeout_s=0.2))

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(HEAD + b"Content-Length: 10\r\n\r\nabc")
        read = await conn.receive_until_closed(timeout_s=5.0)
    assert parse_status(read.data) == 408
    await upstream.wait_until(lambda: all(c.closed for c in upstream.connections))
    assert all(r.complete is False for r in upstream.received)


async def test_idle_keepalive_connection_is_closed_quietly(nursery: trio.Nursery) -> None:
    _, daemon = await _start(nursery, ClientLimits(keepalive_timeout_s=0.2))

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        read = await conn.receive_until_closed(timeout_s=5.0)
    assert read.ending == "eof"
    assert read.data.count(b"HTTP/1.1 200") == 1  # one answer, then a quiet close


async def test_parse_errors_never_echo_header_bytes(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    upstream, daemon = await _start(nursery)
    caplog.set_level("INFO", logger="resilient_ambassador")

    raw = await raw_exchange(
        daemon.port, b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization : Bearer s3cret-canary\r\n\r\n"
    )

    assert parse_status(raw) == 400
    assert b"s3cret-canary" not in raw
    assert "s3cret-canary" not in caplog.text
    assert upstream.connections_accepted == 0
