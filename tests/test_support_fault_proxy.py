"""The fault proxy itself: each fault does what it claims, and faults switch at runtime."""

from __future__ import annotations

import functools

import trio
import trio.testing

from tests.support.client import HttpClient, RawConnection, http_request
from tests.support.fault_proxy import FaultProxy, start_fault_proxy
from tests.support.upstream import FakeUpstream, Reply, start_fake_upstream

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


async def _echo_server(nursery: trio.Nursery) -> int:
    """A TCP echo server (byte-level faults are easiest to see on echoed bytes)."""

    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            return

    listeners: list[trio.SocketListener] = await nursery.start(
        functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
    )
    return int(listeners[0].socket.getsockname()[1])


async def _proxied_upstream(
    nursery: trio.Nursery, reply: Reply | None = None
) -> tuple[FakeUpstream, FaultProxy]:
    upstream = await start_fake_upstream(nursery, default=reply)
    return upstream, await start_fault_proxy(nursery, "127.0.0.1", upstream.port)


async def test_passes_http_through_untouched_and_counts_bytes(nursery: trio.Nursery) -> None:
    upstream, proxy = await _proxied_upstream(nursery, Reply(body=b"hello"))

    response = await http_request(proxy.port, "GET", "/x")

    assert (response.status, response.body) == (200, b"hello")
    assert upstream.received[0].target == b"/x"
    await proxy.connections[0].closed.wait()
    conn = proxy.connections[0]
    assert (conn.connected, conn.ending) == (True, "closed")
    assert conn.bytes_up == len(upstream.connections[0].raw)
    assert conn.bytes_down > len(b"hello")
    assert proxy.open_connections == 0


async def test_latency_and_jitter_delay_each_chunk(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    _, proxy = await _proxied_upstream(nursery)
    proxy.downstream.latency_s = 2.0
    proxy.downstream.jitter_s = 0.5

    started = trio.current_time()
    response = await http_request(proxy.port)

    assert response.status == 200
    assert 1.5 <= trio.current_time() - started <= 2.6


async def test_bandwidth_limit(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    _, proxy = await _proxied_upstream(nursery, Reply(body=b"x" * 10_000))
    proxy.downstream.bandwidth_bytes_per_s = 1000

    started = trio.current_time()
    response = await http_request(proxy.port, timeout_s=60)

    assert len(response.body) == 10_000
    assert trio.current_time() - started >= 10.0


async def test_slice_drips_the_bytes(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    proxy = await start_fault_proxy(nursery, "127.0.0.1", await _echo_server(nursery))
    proxy.downstream.slice_bytes = 3
    proxy.downstream.slice_delay_s = 1.0

    async with await RawConnection.connect(proxy.port) as conn:
        await conn.send(b"abcdefghij")
        reads = [await conn.receive_some() for _ in range(4)]

    assert reads == [b"abc", b"def", b"ghi", b"j"]


async def test_reset_after_bytes_sends_rst_to_the_client(nursery: trio.Nursery) -> None:
    upstream, proxy = await _proxied_upstream(nursery, Reply(body=b"x" * 50_000))
    proxy.downstream.reset_after_bytes = 1000

    async with await RawConnection.connect(proxy.port) as conn:
        await conn.send(GET)
        read = await conn.receive_until_closed()

    assert read.ending == "reset"
    assert len(read.data) <= 1000  # an RST may also discard what was still in flight
    await proxy.connections[0].closed.wait()
    assert proxy.connections[0].ending == "reset"
    await upstream.wait_until(lambda: upstream.connections[0].closed)


async def test_limit_bytes_closes_with_fin_after_exactly_n(nursery: trio.Nursery) -> None:
    _, proxy = await _proxied_upstream(nursery, Reply(body=b"x" * 50_000))
    proxy.downstream.limit_bytes = 1000

    async with await RawConnection.connect(proxy.port) as conn:
        await conn.send(GET)
        read = await conn.receive_until_closed()

    assert (read.ending, len(read.data)) == ("eof", 1000)
    assert read.data.startswith(b"HTTP/1.1 200 ")


async def test_upstream_direction_faults_cut_requests(nursery: trio.Nursery) -> None:
    upstream, proxy = await _proxied_upstream(nursery)
    proxy.upstream.limit_bytes = 10

    async with await RawConnection.connect(proxy.port) as conn:
        await conn.send(GET)
        read = await conn.receive_until_closed()

    assert read.data == b""
    await upstream.wait_until(lambda: all(c.closed for c in upstream.connections))
    assert bytes(upstream.connections[0].raw) == GET[:10]


async def test_blackhole_accepts_and_never_answers(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstream, proxy = await _proxied_upstream(nursery)
    proxy.blackhole = True

    async with await RawConnection.connect(proxy.port) as conn:
        await conn.send(GET)
        read = await conn.receive_until_closed(timeout_s=30)

    assert (read.data, read.ending) == (b"", "timeout")
    assert upstream.connections_accepted == 0
    assert proxy.connections[0].connected is False


async def test_faults_switch_at_runtime_on_open_connections(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    _, proxy = await _proxied_upstream(nursery)

    async with await HttpClient.connect(proxy.port, timeout_s=5) as client:
        assert (await client.request()).status == 200
        proxy.downstream.blackhole = True  # the same connection now goes silent
        with trio.move_on_after(3) as silent:
            await client.request()
    assert silent.cancelled_caught

    proxy.clear()
    assert (await http_request(proxy.port)).status == 200


async def test_cut_all_resets_open_connections(nursery: trio.Nursery) -> None:
    proxy = await start_fault_proxy(nursery, "127.0.0.1", await _echo_server(nursery))

    async with await RawConnection.connect(proxy.port) as conn:
        await conn.send(b"ping")
        assert await conn.receive_some() == b"ping"
        assert proxy.cut_all() == 1
        read = await conn.receive_until_closed()

    assert read.ending == "reset"


async def test_refused_target_resets_the_client(nursery: trio.Nursery) -> None:
    upstream, proxy = await _proxied_upstream(nursery)
    await upstream.stop()

    async with await RawConnection.connect(proxy.port) as conn:
        read = await conn.receive_until_closed()

    assert read.ending == "reset"
    assert proxy.connections[0].ending == "target_refused"
