"""Graceful drain (SIGTERM): stop accepting, finish in-flight requests, close idle keep-alive
connections at once, and give up on stragglers at the grace period."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from resilient_ambassador.core.config import DrainConfig
from tests.support.client import HttpClient, RawConnection, http_request
from tests.support.daemon import simple_config, start_daemon, upstream_config
from tests.support.upstream import Reply, start_fake_upstream


async def test_drain_finishes_in_flight_and_closes_idle(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    upstream.script(Reply(), Reply(delay_s=0.3, body=b"finished"))
    results: list[tuple[int, str | None, bytes]] = []

    with trio.fail_after(5):
        async with trio.open_nursery() as daemon_nursery:
            daemon = await start_daemon(daemon_nursery, simple_config(upstream_config(upstream.url())))
            idle = await HttpClient.connect(daemon.port)
            assert (await idle.request("GET", "/")).status == 200

            async def in_flight() -> None:
                async with await HttpClient.connect(daemon.port) as client:
                    response = await client.request("GET", "/slow")
                    results.append((response.status, response.header("connection"), response.body))

            daemon_nursery.start_soon(in_flight)
            await upstream.wait_received(2)
            daemon.app.drain()

            assert await idle.read_until_eof() == b""  # the idle keep-alive is closed at once
            await idle.close()
            with pytest.raises(OSError, match="all attempts to connect"):
                await trio.open_tcp_stream("127.0.0.1", daemon.port)
        # serve() has returned: the daemon nursery is done.

    assert results == [(200, "close", b"finished")]


async def test_grace_period_cuts_stragglers(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    upstream.script(Reply(delay_s=30))

    with trio.fail_after(5):
        async with trio.open_nursery() as daemon_nursery:
            daemon = await start_daemon(
                daemon_nursery, simple_config(upstream_config(upstream.url()), grace_period_s=0.2)
            )
            conn = await RawConnection.connect(daemon.port)
            await conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            await upstream.wait_received(1)
            daemon.app.drain()
            read = await conn.receive_until_closed()
            await conn.aclose()

    assert read.data == b""
    assert read.ending in ("eof", "reset")


async def test_drain_delay_keeps_serving_while_readyz_says_503(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    upstream = await start_fake_upstream(nursery)
    config = simple_config(upstream_config(upstream.url()))
    config = dataclasses.replace(config, drain=DrainConfig(grace_period_s=5.0, delay_s=10.0))

    async with trio.open_nursery() as daemon_nursery:
        daemon = await start_daemon(daemon_nursery, config)
        daemon_nursery.start_soon(daemon.app.drain_after_delay)
        await trio.testing.wait_all_tasks_blocked()
        readyz = await http_request(daemon.admin_port, "GET", "/readyz")
        during = await http_request(daemon.port, "GET", "/")  # still accepted during the delay
        mock_clock.jump(10.5)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(OSError, match="all attempts to connect"):
            await trio.open_tcp_stream("127.0.0.1", daemon.port)

    assert (readyz.status, readyz.body) == (503, b"draining\n")
    assert during.status == 200
