"""The "Faults" rows of HARDENING.md that concern the upstream, through the real daemon, with
the TCP fault proxy between the daemon and a fake upstream where the fault is a network one.

Cases already pinned elsewhere are not repeated: a Reply that sleeps past the per-try timeout
(test_resilience), a reset right after the head (test_upstream_failures), one stale keep-alive
connection replayed (test_forwarding). Here: faults on the wire, the budgets they must fit in,
and what becomes of the upstream connection afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from resilient_ambassador.core.config import (
    AccessLogConfig,
    BreakerConfig,
    ClientLimits,
    RetryConfig,
    RouteConfig,
    UpstreamTimeouts,
)
from resilient_ambassador.stages.breaker import BreakerStage
from tests.support.client import RawConnection, http_request, parse_responses
from tests.support.daemon import RunningDaemon, simple_config, start_daemon, upstream_config
from tests.support.fault_proxy import FaultProxy, start_fault_proxy
from tests.support.upstream import FakeUpstream, Reply, start_fake_upstream

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


async def _through_proxy(
    nursery: trio.Nursery,
    *,
    default: Reply | None = None,
    route: RouteConfig | None = None,
    breaker: BreakerConfig | None = None,
    timeouts: UpstreamTimeouts | None = None,
) -> tuple[FakeUpstream, FaultProxy, RunningDaemon]:
    """client -> daemon -> fault proxy -> fake upstream."""
    upstream = await start_fake_upstream(nursery, default=default)
    proxy = await start_fault_proxy(nursery, "127.0.0.1", upstream.port)
    fields: dict[str, object] = {}
    if breaker is not None:
        fields["breaker"] = breaker
    if timeouts is not None:
        fields["timeouts"] = timeouts
    config = simple_config(
        upstream_config(proxy.url(), **fields),  # type: ignore[arg-type]
        routes=[route] if route is not None else None,
    )
    return upstream, proxy, await start_daemon(nursery, config)


def _breaker(daemon: RunningDaemon) -> BreakerStage:
    stage = daemon.app.breakers["up"]
    assert isinstance(stage, BreakerStage)
    return stage


async def _all_closed(proxy: FaultProxy) -> None:
    for conn in proxy.connections:
        await conn.closed.wait()


# -- slow upstream ---------------------------------------------------------------------------


async def test_link_slower_than_per_try_timeout_is_504_within_deadline_and_counted(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    retry = RetryConfig(retries=2, per_try_timeout_s=0.2, backoff_base_s=0.01, backoff_max_s=0.01)
    route = RouteConfig(upstream="up", timeout_s=1.0, retry=retry)
    breaker = BreakerConfig(failure_threshold=3, min_requests=0, reset_timeout_s=30.0)
    upstream, proxy, daemon = await _through_proxy(nursery, route=route, breaker=breaker)
    proxy.downstream.latency_s = 10.0  # the upstream answers; its bytes take 10 s to arrive

    started = trio.current_time()
    response = await http_request(daemon.port)
    elapsed = trio.current_time() - started

    assert (response.status, response.header("x-ambassador-error")) == (504, "upstream_timeout")
    assert elapsed <= 1.0  # inside the route's deadline, retries included
    assert len(upstream.received) == 3  # three tries, each cut at its per-try timeout
    stats = _breaker(daemon).stats()
    assert (stats.failures, stats.state) == (3, "open")
    await _all_closed(proxy)  # every timed-out attempt's connection was dropped, never pooled
    assert daemon.app.pools["up"].idle_count == 0

    refused = await http_request(daemon.port)
    assert refused.header("x-ambassador-error") == "circuit_open"
    assert len(proxy.connections) == 3  # the open breaker did not even connect


async def test_blackholed_upstream_times_out_within_the_response_budget(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    timeouts = UpstreamTimeouts(response_s=0.5)
    upstream, proxy, daemon = await _through_proxy(nursery, timeouts=timeouts)
    proxy.blackhole = True  # connects, swallows the request, never answers

    started = trio.current_time()
    response = await http_request(daemon.port)

    assert (response.status, response.header("x-ambassador-error")) == (504, "upstream_timeout")
    assert 0.5 <= trio.current_time() - started < 1.0
    assert upstream.connections_accepted == 0
    await _all_closed(proxy)  # the daemon hung up; nothing left dangling

    proxy.clear()
    assert (await http_request(daemon.port)).status == 200


async def test_unanswered_connect_times_out_at_connect_budget(nursery: trio.Nursery) -> None:
    # A listener with a full accept queue: Linux drops further SYNs, as a firewalled host does.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        for _ in range(4):  # the queue holds backlog + 1; extra connects just hang
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        try:
            config = simple_config(
                upstream_config(f"http://127.0.0.1:{port}", timeouts=UpstreamTimeouts(connect_s=0.3))
            )
            daemon = await start_daemon(nursery, config)
            with trio.fail_after(3):
                response = await http_request(daemon.port)
        finally:
            for filler in fillers:
                filler.close()

    assert (response.status, response.header("x-ambassador-error")) == (504, "upstream_connect_timeout")


async def test_body_stalling_mid_stream_aborts_the_client_at_read_idle(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    reply = Reply(body=[b"a" * 1000, b"b" * 1000, b"c" * 1000], chunk_delay_s=1.0)
    upstream, proxy, daemon = await _through_proxy(
        nursery, default=reply, timeouts=UpstreamTimeouts(read_idle_s=5.0)
    )
    # The head and first chunk arrive; then the link goes silent for good.
    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(GET)
        first = await conn.receive_some()
        proxy.downstream.blackhole = True
        started = trio.current_time()
        read = await conn.receive_until_closed(timeout_s=30)

    assert first.startswith(b"HTTP/1.1 200 ")
    assert read.ending in ("eof", "reset")
    assert 5.0 <= trio.current_time() - started < 10.0
    assert b"0\r\n\r\n" not in first + read.data  # never a clean last chunk
    await _all_closed(proxy)
    assert len(upstream.received) == 1


# -- reset mid-body ----------------------------------------------------------------------------


async def test_reset_mid_chunked_body_aborts_never_retries(nursery: trio.Nursery) -> None:
    reply = Reply(body=[b"x" * 4096] * 16, chunk_delay_s=0.001)
    retry = RetryConfig(retries=3, backoff_base_s=0.001, backoff_max_s=0.001)
    upstream, proxy, daemon = await _through_proxy(
        nursery, default=reply, route=RouteConfig(upstream="up", retry=retry)
    )
    proxy.downstream.reset_after_bytes = 20_000  # headers and a few chunks went out already

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(GET)
        read = await conn.receive_until_closed()

    assert read.data.startswith(b"HTTP/1.1 200 ")
    assert read.ending in ("eof", "reset")
    responses, rest = parse_responses(read.data)
    assert responses == []  # no complete response: the client cannot mistake it for one
    assert rest == read.data
    assert not read.data.endswith(b"0\r\n\r\n")
    assert len(upstream.received) == 1  # a response under way is never retried
    assert daemon.app.pools["up"].idle_count == 0
    proxy.clear()
    assert (await http_request(daemon.port)).status == 200  # and the daemon carries on


async def test_mid_body_resets_are_logged_with_their_reason_and_throttled(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = await start_fake_upstream(nursery, default=Reply(body=b"x" * 50_000, reset_after_head=True))
    config = dataclasses.replace(
        simple_config(upstream_config(upstream.url())),
        access_log=AccessLogConfig(path=str(tmp_path / "a.log")),
    )
    daemon = await start_daemon(nursery, config)
    caplog.set_level("WARNING", logger="resilient_ambassador")

    for _ in range(5):
        async with await RawConnection.connect(daemon.port) as conn:
            await conn.send(GET)
            assert (await conn.receive_until_closed()).ending in ("eof", "reset")

    assert daemon.app.access_log is not None
    await daemon.app.access_log.flush()
    entries = [json.loads(line) for line in (tmp_path / "a.log").read_text().splitlines()]
    assert [(e["status"], e["aborted"], e["reason"]) for e in entries] == [
        (200, True, "upstream_bad_response")
    ] * 5
    assert caplog.text.count("aborting response to client") == 1  # one line a second, not one each


async def test_client_vanishing_mid_body_aborts_the_upstream_request_uncounted(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery)
    breaker = BreakerConfig(failure_threshold=1, min_requests=0)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url(), breaker=breaker)))

    async with await RawConnection.connect(daemon.port) as conn:
        await conn.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        # The body streams: the upstream has the head and the first bytes before we vanish.
        await upstream.wait_until(lambda: sum(len(c.raw) for c in upstream.connections) > 1000)

    await upstream.wait_until(lambda: all(c.closed for c in upstream.connections))
    assert [r.complete for r in upstream.received] == [False]  # cut short, never completed
    stats = _breaker(daemon).stats()
    assert (stats.failures, stats.not_counted, stats.state) == (0, 1, "closed")  # not the upstream's fault
    assert (await http_request(daemon.port)).status == 200


async def test_client_that_stops_reading_is_dropped_at_send_timeout(nursery: trio.Nursery) -> None:
    # 32 MiB streamed in 64 KiB chunks: far more than the socket buffers on the way can hold.
    upstream = await start_fake_upstream(nursery, default=Reply(body=[b"x" * 65536] * 512))
    limits = ClientLimits(send_timeout_s=0.1)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url()), limits=limits))

    async with await RawConnection.connect(daemon.port) as conn:
        conn.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a zero window soon
        await conn.send(GET)
        with trio.fail_after(5):
            # The daemon gives up on us and, with us, on the upstream response it was streaming.
            await upstream.wait_until(lambda: all(c.closed for c in upstream.connections))
            while daemon.app.servers[0].open_connections:  # noqa: ASYNC110
                await trio.sleep(0.01)

    assert daemon.app.pools["up"].idle_count == 0  # a half-read response is never pooled
    assert (await http_request(daemon.port, timeout_s=5)).status == 200


# -- garbage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"HTTP/1.1 2OO OK\r\n\r\n", b"\x16\x03\x01\x00\xff\x00\x00garbage\r\n\r\n"],
    ids=["bad-status", "binary"],
)
async def test_garbage_on_a_kept_open_connection_is_502_and_the_connection_discarded(
    nursery: trio.Nursery, raw: bytes
) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    assert (await http_request(daemon.port)).status == 200  # one pooled connection now
    upstream.script(Reply(raw=raw))  # the upstream keeps the connection open afterwards

    bad = await http_request(daemon.port)
    after = await http_request(daemon.port)

    assert (bad.status, bad.header("x-ambassador-error")) == (502, "upstream_bad_response")
    assert after.status == 200
    assert [r.connection_id for r in upstream.received] == [0, 0, 1]  # never reused after garbage
    await upstream.wait_until(lambda: upstream.connections[0].closed)


async def test_response_dripped_byte_by_byte_arrives_intact(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    reply = Reply(headers=[("x-a", "1"), ("transfer-encoding", "chunked")], body=[b"hello ", b"world"])
    _, proxy, daemon = await _through_proxy(nursery, default=reply)
    proxy.downstream.slice_bytes = 1
    proxy.downstream.slice_delay_s = 0.01

    response = await http_request(daemon.port, timeout_s=60)

    assert (response.status, response.body, response.header("x-a")) == (200, b"hello world", "1")


# -- 503 storm ---------------------------------------------------------------------------------


async def test_503_storm_with_long_retry_after_opens_the_breaker_without_waiting(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    storm = Reply(status=503, headers=[("retry-after", "120")], body=b"overloaded")
    route = RouteConfig(upstream="up", timeout_s=2.0, retry=RetryConfig(retries=3))
    breaker = BreakerConfig(failure_threshold=5, min_requests=0, reset_timeout_s=30.0)
    upstream, _, daemon = await _through_proxy(nursery, default=storm, route=route, breaker=breaker)

    answers = []
    for _ in range(8):
        started = trio.current_time()
        response = await http_request(daemon.port)
        answers.append((response.status, response.header("x-ambassador-error")))
        assert trio.current_time() - started < 2.0  # never waits out Retry-After: 120

    assert answers[:5] == [(503, None)] * 5  # the upstream's own answer, passed through
    assert answers[5:] == [(503, "circuit_open")] * 3
    assert len(upstream.received) == 5  # Retry-After past the deadline: no retry at all
    assert _breaker(daemon).stats().rejected == 3


async def test_503_storm_retries_stay_within_the_budget(nursery: trio.Nursery) -> None:
    retry = RetryConfig(
        retries=3, backoff_base_s=0.001, backoff_max_s=0.001, budget_ratio=0.2, budget_min_per_s=0.0
    )
    upstream, _, daemon = await _through_proxy(
        nursery, default=Reply(status=503), route=RouteConfig(upstream="up", retry=retry)
    )

    statuses = [(await http_request(daemon.port)).status for _ in range(20)]

    assert statuses == [503] * 20
    # 20 requests may add 20% retries: the storm is not multiplied by the attempt count (x4).
    assert 20 < len(upstream.received) <= 24


# -- idle pooled connections -------------------------------------------------------------------


async def test_pooled_connection_reset_while_idle_is_never_used(nursery: trio.Nursery) -> None:
    upstream, proxy, daemon = await _through_proxy(nursery)
    assert (await http_request(daemon.port)).status == 200
    assert proxy.cut_all(reset=True) == 1  # RST on the idle pooled connection
    await _all_closed(proxy)

    posted = await http_request(daemon.port, "POST", "/", body=b"once")

    assert posted.status == 200
    assert [r.method for r in upstream.received] == [b"GET", b"POST"]
    assert [r.connection_id for r in upstream.received] == [0, 1]


@pytest.mark.parametrize("drop", ["fin", "rst"])
async def test_stale_connection_replay_happens_once_only(nursery: trio.Nursery, drop: str) -> None:
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    assert (await http_request(daemon.port)).status == 200
    # The pooled connection dies under the request, and so does the fresh one it is replayed on.
    upstream.script(Reply(drop=drop), Reply(drop=drop))  # type: ignore[arg-type]

    response = await http_request(daemon.port, "GET", "/again")

    assert (response.status, response.header("x-ambassador-error")) == (502, "upstream_bad_response")
    assert [r.target for r in upstream.received] == [b"/", b"/again", b"/again"]
    assert upstream.connections_accepted == 2
