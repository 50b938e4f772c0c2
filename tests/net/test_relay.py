"""TCP relay end to end: real loopback sockets, real TLS (trustme), the real App."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from resilient_ambassador.core.config import BreakerConfig, ListenerTLS, TLSConfig
from resilient_ambassador.net import relay as relay_module
from tests.support.client import RawConnection
from tests.support.daemon import start_daemon
from tests.support.tcp import (
    closed_port,
    echo,
    greeter,
    reset,
    start_tcp_upstream,
    tcp_config,
)
from tests.support.tls import ServerCertKind, make_tls_material

BLOCK_BYTES = 1024 * 1024
TRANSFER_BLOCKS = 24  # 24 MiB each way


def _blocks(seed: bytes) -> list[bytes]:
    """Distinct 1 MiB blocks (numbered, so a reordering changes the digest)."""
    base = hashlib.sha256(seed).digest() * (BLOCK_BYTES // 32)
    return [i.to_bytes(4, "big") + base[4:] for i in range(TRANSFER_BLOCKS)]


async def _exchange(port: int, data: bytes) -> bytes:
    async with await RawConnection.connect(port) as conn:
        await conn.send(data)
        await conn.half_close()
        read = await conn.receive_until_closed()
    assert read.ending == "eof"
    return read.data


async def _refused(port: int) -> bool:
    """Whether the relay closed a new connection without relaying anything (a FIN or, since
    the client's bytes are unread, usually a reset)."""
    async with await RawConnection.connect(port) as conn:
        try:
            await conn.send(b"anyone?")
        except trio.BrokenResourceError:
            return True
        read = await conn.receive_until_closed()
    return read.data == b"" and read.ending in ("eof", "reset")


async def _roundtrip(port: int, data: bytes) -> bytes:
    """Send, read back as many bytes, close: for TLS upstreams, which cannot be half-closed."""
    async with await RawConnection.connect(port) as conn:
        await conn.send(data)
        got = b""
        while len(got) < len(data) and (chunk := await conn.receive_some()):
            got += chunk
    return got


async def test_echo(nursery: trio.Nursery) -> None:
    upstream = await start_tcp_upstream(nursery, echo)
    daemon = await start_daemon(nursery, tcp_config([upstream.address()]))

    assert await _exchange(daemon.port, b"hello relay") == b"hello relay"
    await trio.testing.wait_all_tasks_blocked(cushion=0.01)  # the relay has closed its side

    stats = daemon.app.stats()["tcp_listeners"]
    assert isinstance(stats, dict)
    assert stats["tcp"] == {
        **stats["tcp"],  # type: ignore[dict-item]
        "open_tunnels": 0,
        "tunnels": 1,
        "bytes_to_upstream": 11,
        "bytes_to_client": 11,
    }


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
async def test_large_transfer_both_ways_is_intact(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, splice: bool
) -> None:
    """Tens of MiB each way at once, checksummed at both ends: nothing lost, reordered or
    duplicated, and back-pressure keeps both directions moving; with splice (Linux, bulk) and
    with the copy path."""
    if splice and not relay_module.SPLICE:
        pytest.skip("no splice(2) here")
    monkeypatch.setattr(relay_module, "SPLICE", splice)
    pipes_opened: list[object] = []
    open_pipe = relay_module._open_pipe

    def counting_open_pipe() -> tuple[int, int] | None:
        pipes_opened.append(pipe := open_pipe())
        return pipe

    monkeypatch.setattr(relay_module, "_open_pipe", counting_open_pipe)
    up_blocks, down_blocks = _blocks(b"to-upstream"), _blocks(b"to-client")
    received_upstream = hashlib.sha256()
    upstream_done = trio.Event()

    async def upstream_side(stream: trio.abc.Stream) -> None:
        async def receive() -> None:
            while data := await stream.receive_some(65536):
                received_upstream.update(data)
            upstream_done.set()

        async with trio.open_nursery() as n:
            n.start_soon(receive)
            for block in down_blocks:
                await stream.send_all(block)
            assert isinstance(stream, trio.abc.HalfCloseableStream)
            await stream.send_eof()

    upstream = await start_tcp_upstream(nursery, upstream_side)
    daemon = await start_daemon(nursery, tcp_config([upstream.address()]))
    received_client = hashlib.sha256()

    with trio.fail_after(30):
        async with await RawConnection.connect(daemon.port) as conn:

            async def send() -> None:
                for block in up_blocks:
                    await conn.send(block)
                await conn.half_close()

            async with trio.open_nursery() as n:
                n.start_soon(send)
                while data := await conn.stream.receive_some(65536):
                    received_client.update(data)
            await upstream_done.wait()  # the upstream's EOF may come before it has read everything

    assert received_client.hexdigest() == hashlib.sha256(b"".join(down_blocks)).hexdigest()
    assert received_upstream.hexdigest() == hashlib.sha256(b"".join(up_blocks)).hexdigest()
    relay = daemon.app.relays[0].stats
    assert relay.bytes_to_upstream == relay.bytes_to_client == TRANSFER_BLOCKS * BLOCK_BYTES
    assert len(pipes_opened) == (2 if splice else 0)  # one per direction, once bulk was seen
    assert None not in pipes_opened


async def test_half_close_client_eof_still_receives_upstream_reply(nursery: trio.Nursery) -> None:
    """The client's EOF reaches the upstream as an EOF; the upstream answers after it, and that
    answer still reaches the client."""

    async def count_then_reply(stream: trio.abc.Stream) -> None:
        total = 0
        while data := await stream.receive_some(65536):
            total += len(data)
        await trio.sleep(0.05)  # the reply comes well after the client's EOF
        await stream.send_all(b"got %d bytes" % total)

    upstream = await start_tcp_upstream(nursery, count_then_reply)
    daemon = await start_daemon(nursery, tcp_config([upstream.address()]))

    assert await _exchange(daemon.port, b"x" * 1000) == b"got 1000 bytes"


async def test_upstream_eof_reaches_client_which_can_still_send(nursery: trio.Nursery) -> None:
    got: list[bytes] = []

    async def greet_then_listen(stream: trio.abc.Stream) -> None:
        await stream.send_all(b"banner")
        assert isinstance(stream, trio.abc.HalfCloseableStream)
        await stream.send_eof()
        while data := await stream.receive_some(65536):
            got.append(bytes(data))

    upstream = await start_tcp_upstream(nursery, greet_then_listen)
    daemon = await start_daemon(nursery, tcp_config([upstream.address()]))

    async with await RawConnection.connect(daemon.port) as conn:
        read = await conn.receive_until_closed()
        assert read == type(read)(b"banner", "eof")
        await conn.send(b"after your eof")
        await conn.half_close()
        assert (await conn.receive_until_closed()).ending == "eof"  # the tunnel ended
    assert b"".join(got) == b"after your eof"


async def test_tls_origination_verifies_and_sends_sni(nursery: trio.Nursery, tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    upstream = await start_tcp_upstream(nursery, echo, tls.server_context())
    config = tcp_config([upstream.address("tls", host="localhost")], tls=TLSConfig(ca_file=str(tls.ca_file)))
    daemon = await start_daemon(nursery, config)

    assert await _roundtrip(daemon.port, b"plain text in, TLS out") == b"plain text in, TLS out"
    assert upstream.server_names == ["localhost"]


@pytest.mark.parametrize("cert", ["wrong_name", "untrusted"])
async def test_tls_bad_certificate_fails_closes_and_counts(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, cert: ServerCertKind
) -> None:
    tls = make_tls_material(tmp_path)
    upstream = await start_tcp_upstream(nursery, echo, tls.server_context(cert=cert))
    breaker = BreakerConfig(failure_threshold=5, min_requests=0)
    config = tcp_config(
        [upstream.address("tls", host="localhost")],
        tls=TLSConfig(ca_file=str(tls.ca_file)),
        breaker=breaker,
    )
    daemon = await start_daemon(nursery, config)

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(b"secret request")
        read = await conn.receive_until_closed()

    assert read.data == b""
    assert read.ending in ("eof", "reset")
    relay = daemon.app.relays[0]
    assert relay.stats.connect_failures == 1
    assert relay.stats.tunnels == 0
    assert relay.breaker is not None
    assert relay.breaker.stats().failures == 1
    assert "TLS handshake with tls://localhost" in caplog.text
    assert "certificate" in caplog.text.lower()
    assert upstream.connections == 1  # one attempt, and no plaintext fallback after it


async def test_client_eof_is_not_passed_to_a_tls_upstream_but_its_answer_arrives(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """TLS cannot be half-closed: the client's EOF stops that direction only, and the tunnel
    ends when the upstream closes after answering (docs: TCP relay behaviour)."""
    tls = make_tls_material(tmp_path)
    upstream_saw_eof: list[bool] = []

    async def answer_then_close(stream: trio.abc.Stream) -> None:
        got = b""
        while len(got) < 5:
            got += await stream.receive_some(100)
        with trio.move_on_after(0.05):
            upstream_saw_eof.append(await stream.receive_some(100) == b"")
        await stream.send_all(b"answer to " + got)

    upstream = await start_tcp_upstream(nursery, answer_then_close, tls.server_context())
    daemon = await start_daemon(
        nursery,
        tcp_config([upstream.address("tls", host="localhost")], tls=TLSConfig(ca_file=str(tls.ca_file))),
    )

    assert await _exchange(daemon.port, b"hello") == b"answer to hello"
    assert upstream_saw_eof == []  # the read timed out: no EOF reached it
    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
    assert daemon.app.relays[0].stats.open_tunnels == 0


async def test_tls_min_version_is_enforced(nursery: trio.Nursery, tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    server = tls.server_context()
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    upstream = await start_tcp_upstream(nursery, echo, server)
    origination = TLSConfig(ca_file=str(tls.ca_file), min_version="1.3")
    daemon = await start_daemon(
        nursery, tcp_config([upstream.address("tls", host="localhost")], tls=origination)
    )

    assert await _refused(daemon.port)
    assert daemon.app.relays[0].stats.connect_failures == 1


async def test_mtls_presents_the_client_certificate(nursery: trio.Nursery, tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    upstream = await start_tcp_upstream(nursery, echo, tls.server_context(require_client_cert=True))
    origination = TLSConfig(
        ca_file=str(tls.ca_file),
        cert_file=str(tls.client_cert_file),
        key_file=str(tls.client_key_file),
        min_version="1.3",
    )
    daemon = await start_daemon(
        nursery, tcp_config([upstream.address("tls", host="localhost")], tls=origination)
    )

    assert await _roundtrip(daemon.port, b"mutual") == b"mutual"


async def test_listener_side_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server-key.pem"
    tls.server_cert.cert_chain_pems[0].write_to_path(str(cert_file))
    tls.server_cert.private_key_pem.write_to_path(str(key_file))
    upstream = await start_tcp_upstream(nursery, echo)
    daemon = await start_daemon(
        nursery, tcp_config([upstream.address()], listener_tls=ListenerTLS(str(cert_file), str(key_file)))
    )

    with trio.fail_after(5):
        tcp = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        client = trio.SSLStream(tcp, tls.client_context(), server_hostname="localhost")
        await client.send_all(b"over TLS")
        assert await client.receive_some(100) == b"over TLS"
        await client.aclose()


async def test_refused_upstream_closes_the_client(nursery: trio.Nursery) -> None:
    daemon = await start_daemon(nursery, tcp_config([f"tcp://127.0.0.1:{closed_port()}"]))

    assert await _refused(daemon.port)
    assert daemon.app.relays[0].stats.connect_failures == 1


async def test_upstream_reset_is_passed_on(nursery: trio.Nursery) -> None:
    async def read_then_reset(stream: trio.abc.Stream) -> None:
        await stream.receive_some(100)
        await stream.send_all(b"partial")
        reset(stream)

    upstream = await start_tcp_upstream(nursery, read_then_reset)
    daemon = await start_daemon(nursery, tcp_config([upstream.address()]))

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(b"go")
        read = await conn.receive_until_closed()

    assert read.ending == "reset"
    assert daemon.app.relays[0].stats.resets == 1


async def test_client_reset_closes_the_upstream(nursery: trio.Nursery) -> None:
    ended = trio.Event()

    async def wait_for_end(stream: trio.abc.Stream) -> None:
        try:
            while await stream.receive_some(100):
                pass
        finally:
            ended.set()

    upstream = await start_tcp_upstream(nursery, wait_for_end)
    daemon = await start_daemon(nursery, tcp_config([upstream.address()]))
    conn = await RawConnection.connect(daemon.port)
    await conn.send(b"hi")
    reset(conn.stream)

    with trio.fail_after(5):
        await ended.wait()
    assert daemon.app.relays[0].stats.resets == 1


async def test_failover_to_the_second_address(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = await start_tcp_upstream(nursery, greeter(b"second|"))
    dead = f"127.0.0.1:{closed_port()}"
    daemon = await start_daemon(nursery, tcp_config([f"tcp://{dead}", upstream.address()]))

    assert await _exchange(daemon.port, b"x") == b"second|x"
    assert f"connect to {dead} failed: Connection refused" in caplog.text
    assert "trying the next address" in caplog.text


async def test_round_robin(nursery: trio.Nursery) -> None:
    a = await start_tcp_upstream(nursery, greeter(b"a"))
    b = await start_tcp_upstream(nursery, greeter(b"b"))
    daemon = await start_daemon(nursery, tcp_config([a.address(), b.address()], balance="round_robin"))

    assert [await _exchange(daemon.port, b"") for _ in range(4)] == [b"a", b"b", b"a", b"b"]


async def test_ordered_always_starts_with_the_first(nursery: trio.Nursery) -> None:
    a = await start_tcp_upstream(nursery, greeter(b"a"))
    b = await start_tcp_upstream(nursery, greeter(b"b"))
    daemon = await start_daemon(nursery, tcp_config([a.address(), b.address()]))

    assert [await _exchange(daemon.port, b"") for _ in range(3)] == [b"a", b"a", b"a"]


async def test_dns_failure_has_a_clear_log_line(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = await start_daemon(nursery, tcp_config(["tcp://no-such-host.invalid:5432"]))

    assert await _refused(daemon.port)
    assert "DNS resolution failed for no-such-host.invalid" in caplog.text


async def test_idle_timeout(nursery: trio.Nursery, mock_clock: trio.testing.MockClock) -> None:
    upstream = await start_tcp_upstream(nursery, echo)
    daemon = await start_daemon(nursery, tcp_config([upstream.address()], idle_timeout_s=300))

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(b"ping")
        assert await conn.receive_some() == b"ping"
        mock_clock.jump(299)
        await conn.send(b"still here")  # activity restarts the idle timer
        assert await conn.receive_some() == b"still here"
        mock_clock.jump(299)
        await trio.testing.wait_all_tasks_blocked()
        assert daemon.app.relays[0].stats.idle_timeouts == 0
        mock_clock.jump(2)
        read = await conn.receive_until_closed()

    assert read == type(read)(b"", "eof")
    assert daemon.app.relays[0].stats.idle_timeouts == 1


async def _open_tunnel(port: int) -> RawConnection:
    conn = await RawConnection.connect(port)
    await conn.send(b"hold")
    assert await conn.receive_some() == b"hold"
    return conn


async def test_max_connections_refuse(nursery: trio.Nursery) -> None:
    upstream = await start_tcp_upstream(nursery, echo)
    daemon = await start_daemon(nursery, tcp_config([upstream.address()], max_connections=1))

    async with await _open_tunnel(daemon.port):
        assert await _refused(daemon.port)
    assert daemon.app.relays[0].stats.refused_limit == 1
    assert upstream.connections == 1


async def test_max_connections_queue_then_pass(nursery: trio.Nursery) -> None:
    upstream = await start_tcp_upstream(nursery, echo)
    daemon = await start_daemon(
        nursery, tcp_config([upstream.address()], max_connections=1, on_limit="queue", queue_timeout_s=5)
    )
    first = await _open_tunnel(daemon.port)
    results: list[bytes] = []

    async def second() -> None:
        results.append(await _exchange(daemon.port, b"queued"))

    async with trio.open_nursery() as n:
        n.start_soon(second)
        await trio.sleep(0.05)
        assert results == []  # waiting for the slot
        await first.half_close()
        assert (await first.receive_until_closed()).ending == "eof"
        await first.aclose()
    assert results == [b"queued"]


async def test_max_connections_queue_times_out(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    upstream = await start_tcp_upstream(nursery, echo)
    daemon = await start_daemon(
        nursery, tcp_config([upstream.address()], max_connections=1, on_limit="queue", queue_timeout_s=2)
    )
    async with await _open_tunnel(daemon.port), await RawConnection.connect(daemon.port) as queued:
        await queued.send(b"waiting")
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the relay queues it
        mock_clock.jump(2.5)
        read = await queued.receive_until_closed()
    assert read.data == b""
    assert daemon.app.relays[0].stats.refused_limit == 1


async def test_connection_rate(nursery: trio.Nursery) -> None:
    upstream = await start_tcp_upstream(nursery, echo)
    daemon = await start_daemon(nursery, tcp_config([upstream.address()], connection_rate=(2.0, 60.0)))

    assert [await _exchange(daemon.port, b"r") for _ in range(2)] == [b"r", b"r"]
    assert await _refused(daemon.port)
    assert daemon.app.relays[0].stats.refused_rate == 1


async def test_breaker_opens_on_connect_failures_and_refuses_fast(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    port = closed_port()
    breaker = BreakerConfig(failure_threshold=2, min_requests=0, reset_timeout_s=30)
    daemon = await start_daemon(nursery, tcp_config([f"tcp://127.0.0.1:{port}"], breaker=breaker))
    relay = daemon.app.relays[0]

    for _ in range(3):
        assert await _refused(daemon.port)
    assert relay.stats.connect_failures == 2  # the third never tried to connect
    assert relay.stats.refused_breaker == 1
    assert relay.breaker is not None
    assert relay.breaker.state == "open"

    # The upstream comes back: after reset_timeout a probe passes and closes the breaker.
    upstream = await start_tcp_upstream(nursery, echo)
    daemon2_config = tcp_config([upstream.address()], breaker=breaker)
    assert daemon2_config.listeners[0].relay is not None
    mock_clock.jump(31)
    relay.relay = daemon2_config.listeners[0].relay  # same breaker, now a live address
    assert await _exchange(daemon.port, b"back") == b"back"
    assert relay.breaker.state == "closed"


async def test_drain_lets_an_open_tunnel_finish(nursery: trio.Nursery) -> None:
    upstream = await start_tcp_upstream(nursery, echo)
    with trio.fail_after(5):
        async with trio.open_nursery() as daemon_nursery:
            daemon = await start_daemon(daemon_nursery, tcp_config([upstream.address()]))
            conn = await _open_tunnel(daemon.port)
            daemon.app.drain()
            with pytest.raises(OSError, match="all attempts to connect"):
                await trio.open_tcp_stream("127.0.0.1", daemon.port)
            await conn.send(b"still relayed")  # the open tunnel keeps working
            assert await conn.receive_some() == b"still relayed"
            await conn.half_close()
            assert (await conn.receive_until_closed()).ending == "eof"
            await conn.aclose()
        # serve() returned once the last tunnel ended, long before the grace period.


async def test_drain_grace_period_closes_tunnels(nursery: trio.Nursery) -> None:
    upstream = await start_tcp_upstream(nursery, echo)
    with trio.fail_after(5):
        async with trio.open_nursery() as daemon_nursery:
            daemon = await start_daemon(daemon_nursery, tcp_config([upstream.address()], grace_period_s=0.1))
            conn = await _open_tunnel(daemon.port)
            daemon.app.drain()
            read = await conn.receive_until_closed()
            await conn.aclose()
    assert read.data == b""
    assert read.ending in ("eof", "reset")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_no_socket_or_pipe_leaks(nursery: trio.Nursery) -> None:
    """Every way a tunnel ends gives back its sockets (and splice pipes)."""

    async def read_then_reset(stream: trio.abc.Stream) -> None:
        await stream.receive_some(100)
        reset(stream)

    async def bulk_source(stream: trio.abc.Stream) -> None:
        await stream.receive_some(100)
        for block in _blocks(b"fd-check")[:4]:
            await stream.send_all(block)
        assert isinstance(stream, trio.abc.HalfCloseableStream)
        await stream.send_eof()

    echoing = await start_tcp_upstream(nursery, echo)
    resetting = await start_tcp_upstream(nursery, read_then_reset)
    bulky = await start_tcp_upstream(nursery, bulk_source)
    daemons = [
        await start_daemon(nursery, tcp_config([up.address()], max_connections=2))
        for up in (echoing, resetting, bulky)
    ]
    refused = await start_daemon(nursery, tcp_config([f"tcp://127.0.0.1:{closed_port()}"]))
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    before = _open_fds()

    for _ in range(3):
        assert await _exchange(daemons[0].port, b"fine") == b"fine"
        async with await RawConnection.connect(daemons[1].port) as conn:
            await conn.send(b"go")
            assert (await conn.receive_until_closed()).ending == "reset"
        assert len(await _exchange(daemons[2].port, b"give")) == 4 * BLOCK_BYTES
        assert await _refused(refused.port)
    async with await _open_tunnel(daemons[0].port), await _open_tunnel(daemons[0].port):
        assert await _refused(daemons[0].port)  # over max_connections
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)

    assert _open_fds() == before
    assert sum(d.app.relays[0].stats.open_tunnels for d in daemons) == 0


async def test_back_pressure_bounds_what_a_slow_reader_costs(nursery: trio.Nursery) -> None:
    """A client that stops reading stops the upstream's writes (no buffering in the daemon
    beyond one chunk per direction): the relay forwards only what the kernel buffers hold."""
    sent = 0

    async def flood(stream: trio.abc.Stream) -> None:
        nonlocal sent
        block = bytes(16 * 1024)  # small, so `sent` is close to what the kernel took
        while True:
            await stream.send_all(block)
            sent += len(block)

    upstream = await start_tcp_upstream(nursery, flood)
    daemon = await start_daemon(nursery, tcp_config([upstream.address()]))
    async with await RawConnection.connect(daemon.port):  # never reads
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        stalled_at = daemon.app.relays[0].stats.bytes_to_client
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)

        assert daemon.app.relays[0].stats.bytes_to_client == stalled_at  # nothing moves now
        assert 0 < stalled_at <= sent
        # What the upstream got rid of is bounded by socket buffers on the two legs (a few MiB
        # with Linux autotuning), not by the flood: the daemon holds at most one chunk.
        assert sent < 16 * BLOCK_BYTES


async def test_tunnel_end_is_logged_with_reason_and_bytes(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_ambassador.relay")
    upstream = await start_tcp_upstream(nursery, echo)
    daemon = await start_daemon(nursery, tcp_config([upstream.address()]))

    assert await _exchange(daemon.port, b"12345") == b"12345"
    await trio.testing.wait_all_tasks_blocked(cushion=0.01)

    assert "tunnel closed (done)" in caplog.text
    assert "5 bytes to upstream, 5 to client" in caplog.text
