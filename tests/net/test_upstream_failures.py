"""What the client sees when the upstream fails: the daemon's own 502/504 with a JSON reason,
or an aborted connection once the response has started."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import trio

from resilient_ambassador.core.config import RouteConfig, TLSConfig, UpstreamTimeouts
from tests.support.client import RawConnection, http_request, parse_status
from tests.support.daemon import simple_config, start_daemon, upstream_config
from tests.support.process import free_port as _free_port
from tests.support.tls import make_tls_material
from tests.support.upstream import Reply, echo, start_fake_upstream


async def test_refused_upstream_is_502_with_reason(nursery: trio.Nursery) -> None:
    port = _free_port()
    daemon = await start_daemon(nursery, simple_config(upstream_config(f"http://127.0.0.1:{port}")))

    response = await http_request(daemon.port, "GET", "/")

    assert response.status == 502
    assert response.header("x-ambassador-error") == "upstream_connect_failed"
    doc = json.loads(response.body)
    assert doc["error"] == "upstream_connect_failed"
    assert doc["upstream"] == "up"
    assert response.header("content-type") == "application/json"


async def test_dns_failure_is_502_naming_dns(nursery: trio.Nursery) -> None:
    daemon = await start_daemon(nursery, simple_config(upstream_config("http://no-such-host.invalid:80")))

    response = await http_request(daemon.port, "GET", "/")

    assert response.status == 502
    assert response.header("x-ambassador-error") == "upstream_dns_failed"


async def test_slow_upstream_is_504_and_connection_not_reused(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    config = simple_config(upstream_config(upstream.url(), timeouts=UpstreamTimeouts(response_s=0.1)))
    daemon = await start_daemon(nursery, config)
    upstream.script(Reply(delay_s=1.0))

    slow = await http_request(daemon.port, "GET", "/")
    after = await http_request(daemon.port, "GET", "/")

    assert slow.status == 504
    assert slow.header("x-ambassador-error") == "upstream_timeout"
    assert after.status == 200
    assert upstream.connections_accepted == 2


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"\x00\x01\x02garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(200))
        + b"Content-Length: 0\r\n\r\n",
    ],
    ids=["bad-status", "binary", "cr-in-value", "200-headers"],
)
async def test_garbage_response_is_502(nursery: trio.Nursery, raw: bytes) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    upstream.script(Reply(raw=raw, close_after=True))

    response = await http_request(daemon.port, "GET", "/")

    assert response.status == 502
    assert response.header("x-ambassador-error") == "upstream_bad_response"
    assert (await http_request(daemon.port, "GET", "/")).status == 200  # the daemon carries on


async def test_double_framing_response_is_dechunked_and_connection_discarded(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    upstream.script(
        Reply(
            raw=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
    )

    first = await http_request(daemon.port, "GET", "/")
    second = await http_request(daemon.port, "GET", "/")

    assert (first.status, first.body) == (200, b"hello")
    assert first.header("content-length") is None
    assert second.status == 200
    assert upstream.connections_accepted == 2  # never reused after double framing


async def test_reset_mid_body_aborts_client_connection(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    upstream.script(Reply(body=b"x" * 100_000, reset_after_head=True))

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        read = await conn.receive_until_closed()

    assert read.data.startswith(b"HTTP/1.1 200 ")
    head, _, body = read.data.partition(b"\r\n\r\n")
    assert b"content-length: 100000" in head.lower()
    assert len(body) < 100_000  # truncated, and the connection was cut: never a clean end
    assert read.ending in ("eof", "reset")


async def test_upstream_closing_before_answer_on_fresh_connection_is_502(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    upstream.script(Reply(drop="rst"))

    response = await http_request(daemon.port, "GET", "/")

    assert response.status == 502
    assert len(upstream.received) == 1  # a fresh connection is not replayed


# -- TLS origination -------------------------------------------------------------------------


async def test_https_upstream_verified_with_sni(nursery: trio.Nursery, tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    names: list[str | None] = []
    context = tls.server_context()
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)
    upstream = await start_fake_upstream(nursery, tls=context, default=echo)
    config = simple_config(upstream_config(upstream.url(), tls=TLSConfig(ca_file=str(tls.ca_file))))
    daemon = await start_daemon(nursery, config)

    response = await http_request(daemon.port, "GET", "/secure")

    assert response.status == 200
    assert names == ["localhost"]
    assert upstream.received[0].header("host") == f"localhost:{upstream.port}"


@pytest.mark.parametrize(
    ("cert", "reason"),
    [("wrong_name", b"Hostname mismatch"), ("untrusted", b"unable to get local issuer certificate")],
)
async def test_bad_certificate_is_502_never_plaintext(
    nursery: trio.Nursery, tmp_path: Path, cert: str, reason: bytes
) -> None:
    tls = make_tls_material(tmp_path)
    upstream = await start_fake_upstream(nursery, tls=tls.server_context(cert=cert))  # type: ignore[arg-type]
    config = simple_config(upstream_config(upstream.url(), tls=TLSConfig(ca_file=str(tls.ca_file))))
    daemon = await start_daemon(nursery, config)

    response = await http_request(daemon.port, "GET", "/")

    assert response.status == 502
    assert response.header("x-ambassador-error") == "upstream_tls_failed"
    assert reason in response.body
    assert upstream.received == []


async def test_system_cas_do_not_trust_a_private_ca(nursery: trio.Nursery, tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    upstream = await start_fake_upstream(nursery, tls=tls.server_context())
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))

    response = await http_request(daemon.port, "GET", "/")

    assert response.status == 502
    assert response.header("x-ambassador-error") == "upstream_tls_failed"


async def test_mtls_client_certificate(nursery: trio.Nursery, tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    upstream = await start_fake_upstream(nursery, tls=tls.server_context(require_client_cert=True))
    without = await start_daemon(
        nursery, simple_config(upstream_config(upstream.url(), tls=TLSConfig(ca_file=str(tls.ca_file))))
    )
    with_cert = await start_daemon(
        nursery,
        simple_config(
            upstream_config(
                upstream.url(),
                tls=TLSConfig(
                    ca_file=str(tls.ca_file),
                    cert_file=str(tls.client_cert_file),
                    key_file=str(tls.client_key_file),
                ),
            )
        ),
    )

    assert (await http_request(with_cert.port, "GET", "/")).status == 200
    assert (await http_request(without.port, "GET", "/")).status == 502


async def test_oversized_response_head_in_one_read_is_502(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    big = b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"v" * 40_000 + b"\r\nContent-Length: 0\r\n\r\n"
    upstream.script(Reply(raw=big, close_after=True))

    response = await http_request(daemon.port, "GET", "/")

    assert response.status == 502
    assert b"response head too large" in response.body


async def test_upstream_that_stops_reading_the_body_is_504(nursery: trio.Nursery) -> None:
    # A raw listener that accepts and never reads: our writes fill the socket buffers.
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    accepted: list[trio.abc.Stream] = []

    async def accept_and_ignore() -> None:
        accepted.append(await listener.accept())

    nursery.start_soon(accept_and_ignore)
    config = simple_config(
        upstream_config(f"http://127.0.0.1:{port}", timeouts=UpstreamTimeouts(read_idle_s=0.2)),
        routes=[RouteConfig(upstream="up", max_request_body_bytes=100_000_000)],
    )
    daemon = await start_daemon(nursery, config)

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 64000000\r\n\r\n")

        async def send_body() -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                for _ in range(1000):
                    await conn.send(b"x" * 64_000)

        async with trio.open_nursery() as senders:
            senders.start_soon(send_body)
            read = await conn.receive_until_closed()
            senders.cancel_scope.cancel()

    assert parse_status(read.data) == 504
    assert b"stopped reading the request" in read.data
    for stream in accepted:
        await stream.aclose()
    await listener.aclose()
