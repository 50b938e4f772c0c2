"""The breaker stage against a scripted in-memory upstream, on trio's MockClock."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import pybreaker
import pytest
import trio
import trio.testing

from resilient_ambassador.core.config import BreakerConfig
from resilient_ambassador.core.errors import (
    BreakerOpen,
    ClientError,
    DeadlineExceeded,
    StaleConnection,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDNSError,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
)
from resilient_ambassador.core.messages import BufferedBody, Request, Response
from resilient_ambassador.stages.breaker import (
    HALF_OPEN_RETRY_AFTER_S,
    BreakerStage,
    maybe_breaker,
)

REQUEST = Request(method=b"GET", target=b"/x", headers=[])
RESET_S = 30.0


@dataclass(frozen=True)
class Step:
    """One scripted upstream outcome: a status, or an exception, after `delay_s`."""

    status: int = 200
    error: BaseException | None = None
    delay_s: float = 0.0


class ScriptedUpstream:
    """In-memory inner handler: plays `steps` in order, then `default`; counts calls and
    releases of the responses it handed out."""

    def __init__(self, *steps: Step | int | BaseException, default: Step = Step(200)) -> None:
        self.script: deque[Step] = deque(_step(s) for s in steps)
        self.default = default
        self.calls = 0
        self.released = 0
        self.responses: list[Response] = []

    def then(self, *steps: Step | int | BaseException) -> None:
        self.script.extend(_step(s) for s in steps)

    async def __call__(self, request: Request) -> Response:
        self.calls += 1
        step = self.script.popleft() if self.script else self.default
        if step.delay_s:
            await trio.sleep(step.delay_s)
        if step.error is not None:
            raise step.error
        response = Response(status=step.status, headers=[], body=BufferedBody(b"body"), release=self._release)
        self.responses.append(response)
        return response

    def _release(self) -> None:
        self.released += 1


def _step(s: Step | int | BaseException) -> Step:
    if isinstance(s, Step):
        return s
    if isinstance(s, int):
        return Step(status=s)
    return Step(error=s)


def make(
    upstream: ScriptedUpstream, listeners: list[pybreaker.CircuitBreakerListener] | None = None, **kw: Any
) -> BreakerStage:
    # Defaults: trip on 3 consecutive failures, no volume guard unless a test asks for one.
    settings: dict[str, Any] = {
        "failure_threshold": 3,
        "reset_timeout_s": RESET_S,
        "min_requests": 0,
        "window_s": 10.0,
    }
    settings.update(kw)
    return BreakerStage(upstream, BreakerConfig(**settings), name="billing", listeners=listeners or ())


async def statuses(stage: BreakerStage, n: int) -> list[int]:
    return [(await stage(REQUEST)).status for _ in range(n)]


async def trip(stage: BreakerStage, upstream: ScriptedUpstream) -> None:
    upstream.then(*[503] * stage.config.failure_threshold)
    assert await statuses(stage, stage.config.failure_threshold) == [503] * stage.config.failure_threshold
    assert stage.state == "open"


async def expect_open(stage: BreakerStage) -> BreakerOpen:
    with pytest.raises(BreakerOpen) as info:
        await stage(REQUEST)
    return info.value


# -- closed -> open ------------------------------------------------------------------------


async def test_consecutive_failure_statuses_open_it_and_the_upstream_sees_no_calls_until_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ScriptedUpstream(503, 503)
    stage = make(upstream)
    assert await statuses(stage, 2) == [503, 503]
    assert stage.state == "closed"
    upstream.then(503)
    response = await stage(REQUEST)  # the call that trips it still gets the upstream's answer
    assert response.status == 503
    assert stage.state == "open"
    for _ in range(12):  # 2.5 s steps add up exactly: the last rejection is at 27.5 s
        await expect_open(stage)
        await trio.sleep(2.5)
    assert upstream.calls == 3
    assert (await stage(REQUEST)).status == 200
    assert upstream.calls == 4


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_each_default_failure_status_counts(
    autojump_clock: trio.testing.MockClock, status: int
) -> None:
    upstream = ScriptedUpstream(default=Step(status))
    stage = make(upstream)
    assert await statuses(stage, 3) == [status] * 3
    assert stage.state == "open"


async def test_failure_statuses_are_configurable(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ScriptedUpstream(default=Step(500))
    stage = make(upstream)
    await statuses(stage, 10)
    assert stage.state == "closed"  # 500 is not in the default list
    stage = make(ScriptedUpstream(default=Step(500)), failure_statuses=frozenset({500}))
    await statuses(stage, 3)
    assert stage.state == "open"


@pytest.mark.parametrize(
    "error",
    [
        UpstreamConnectError("refused", upstream="billing"),
        UpstreamDNSError("nxdomain", upstream="billing"),
        UpstreamTLSError("bad cert", upstream="billing"),
        UpstreamTimeout("slow", upstream="billing"),
        UpstreamConnectTimeout("slow connect", upstream="billing"),
        UpstreamProtocolError("garbage", upstream="billing"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_upstream_errors_open_it_and_come_out_unchanged(
    autojump_clock: trio.testing.MockClock, error: UpstreamError
) -> None:
    stage = make(ScriptedUpstream(default=Step(error=error)))
    for _ in range(3):  # the tripping call too: never CircuitBreakerError
        with pytest.raises(type(error)) as info:
            await stage(REQUEST)
        assert info.value is error
    assert stage.state == "open"
    await expect_open(stage)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429])
async def test_4xx_is_a_success_and_never_opens(autojump_clock: trio.testing.MockClock, status: int) -> None:
    stage = make(ScriptedUpstream(default=Step(status)))
    assert await statuses(stage, 50) == [status] * 50
    assert stage.state == "closed"
    assert stage.stats().successes == 50


async def test_a_success_breaks_the_streak(autojump_clock: trio.testing.MockClock) -> None:
    stage = make(ScriptedUpstream(503, 503, 404, 503, 503, 200, 503, 503))
    await statuses(stage, 8)
    assert stage.state == "closed"


# -- volume guard ----------------------------------------------------------------------------


async def test_fewer_than_min_requests_in_the_window_never_opens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ScriptedUpstream(default=Step(503))
    stage = make(upstream, failure_threshold=2, min_requests=5, window_s=10.0)
    for _ in range(30):  # a failure every 2.5 s: 4 in any 10 s window, all failures
        assert (await stage(REQUEST)).status == 503
        assert stage.state == "closed"
        await trio.sleep(2.5)
    assert upstream.calls == 30


async def test_the_streak_opens_it_once_the_volume_is_there(autojump_clock: trio.testing.MockClock) -> None:
    stage = make(ScriptedUpstream(default=Step(503)), failure_threshold=2, min_requests=5, window_s=10.0)
    await statuses(stage, 4)
    assert stage.state == "closed"  # streak of 4 >= 2, but only 4 requests in the window
    await stage(REQUEST)
    assert stage.state == "open"  # fifth request in the window


async def test_successes_count_towards_the_volume(autojump_clock: trio.testing.MockClock) -> None:
    stage = make(ScriptedUpstream(200, 200, 200, 503, 503), failure_threshold=2, min_requests=5)
    await statuses(stage, 4)
    assert stage.state == "closed"
    await stage(REQUEST)
    assert stage.state == "open"


async def test_old_requests_slide_out_of_the_window(autojump_clock: trio.testing.MockClock) -> None:
    stage = make(ScriptedUpstream(default=Step(503)), failure_threshold=2, min_requests=5, window_s=10.0)
    await statuses(stage, 4)
    await trio.sleep(10.0)
    await statuses(stage, 4)
    assert stage.state == "closed"  # 8 failures in a row, but never 5 in 10 s
    await stage(REQUEST)
    assert stage.state == "open"


# -- open: fail fast with Retry-After ----------------------------------------------------------


async def test_breaker_open_is_a_503_with_the_time_left_until_half_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream)
    await trip(stage, upstream)
    exc = await expect_open(stage)
    assert exc.retry_after_s == pytest.approx(RESET_S)
    await trio.sleep(12.0)
    exc = await expect_open(stage)
    assert exc.status == 503
    assert exc.reason == "circuit_open"
    assert exc.upstream == "billing"
    assert exc.retry_after_s == pytest.approx(RESET_S - 12.0)
    assert "billing" in exc.message
    assert "open" in exc.message
    assert b'"upstream":"billing"' in exc.body()
    assert stage.time_until_half_open() == pytest.approx(RESET_S - 12.0)


async def test_late_results_do_not_push_the_open_period_back(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ScriptedUpstream(Step(503, delay_s=5.0), Step(503, delay_s=10.0))
    stage = make(upstream, failure_threshold=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage, REQUEST)
        nursery.start_soon(stage, REQUEST)
    # Opened at t=5 by the first; the second failed at t=10 after it had opened.
    assert stage.stats().opened == 1
    exc = await expect_open(stage)
    assert exc.retry_after_s == pytest.approx(RESET_S - 5.0)


async def test_a_late_success_from_before_it_opened_is_not_a_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A (slow, admitted while closed) answers 200 while the breaker is half-open with its probe
    # in flight: only the probe's verdict counts.
    upstream = ScriptedUpstream(Step(200, delay_s=40.0), Step(503, delay_s=1.0), Step(503, delay_s=20.0))
    stage = make(upstream, failure_threshold=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage, REQUEST)  # A: t=0 -> 40
        nursery.start_soon(stage, REQUEST)  # B: fails at t=1, opens it
        await trio.sleep(1.0 + RESET_S)
        nursery.start_soon(stage, REQUEST)  # the probe: t=31 -> 51
        await trio.sleep(10.0)  # t=41: A has answered 200
        assert stage.state == "half-open"
        await expect_open(stage)  # the probe still holds the only slot
    assert stage.state == "open"  # the probe failed
    assert stage.stats().successes == 1


# -- half-open -------------------------------------------------------------------------------


async def test_after_reset_exactly_one_probe_passes_while_others_fail_fast(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream)
    await trip(stage, upstream)
    await trio.sleep(RESET_S)
    upstream.then(Step(200, delay_s=5.0))
    calls_before = upstream.calls
    probe: list[Response] = []

    async def run_probe() -> None:
        probe.append(await stage(REQUEST))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_probe)
        await trio.sleep(1.0)
        assert stage.state == "half-open"
        for _ in range(20):
            exc = await expect_open(stage)
            assert exc.retry_after_s == HALF_OPEN_RETRY_AFTER_S
            assert "half-open" in exc.message
        assert upstream.calls == calls_before + 1
    assert probe[0].status == 200
    assert stage.state == "closed"


async def test_a_successful_probe_closes_it(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream)
    await trip(stage, upstream)
    await trio.sleep(RESET_S)
    assert (await stage(REQUEST)).status == 200
    assert stage.state == "closed"
    assert await statuses(stage, 5) == [200] * 5
    # The streak starts again from zero.
    upstream.then(503, 503)
    await statuses(stage, 2)
    assert stage.state == "closed"


@pytest.mark.parametrize("failure", [503, UpstreamConnectError("refused", upstream="billing")], ids=str)
async def test_a_failed_probe_reopens_it_for_a_fresh_reset_timeout(
    autojump_clock: trio.testing.MockClock, failure: int | UpstreamError
) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream)
    await trip(stage, upstream)
    await trio.sleep(RESET_S + 5.0)
    upstream.then(failure)
    if isinstance(failure, int):
        assert (await stage(REQUEST)).status == failure
    else:
        with pytest.raises(UpstreamConnectError):
            await stage(REQUEST)
    assert stage.state == "open"
    exc = await expect_open(stage)
    assert exc.retry_after_s == pytest.approx(RESET_S)
    assert stage.stats().opened == 2


async def test_success_threshold_probes_are_needed_to_close(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream, success_threshold=3)
    await trip(stage, upstream)
    await trio.sleep(RESET_S)
    await statuses(stage, 2)
    assert stage.state == "half-open"
    await stage(REQUEST)
    assert stage.state == "closed"


async def test_half_open_max_probes_bounds_concurrent_probes(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream, half_open_max_probes=2, success_threshold=2)
    await trip(stage, upstream)
    await trio.sleep(RESET_S)
    upstream.then(Step(200, delay_s=5.0), Step(200, delay_s=5.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage, REQUEST)
        nursery.start_soon(stage, REQUEST)
        await trio.sleep(1.0)
        assert stage.stats().probes_in_flight == 2
        await expect_open(stage)
    assert upstream.calls == 3 + 2
    assert stage.state == "closed"


# -- what is not a failure -----------------------------------------------------------------


async def test_cancellation_is_neither_failure_nor_success(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ScriptedUpstream(default=Step(200, delay_s=10.0))
    stage = make(upstream)
    upstream.then(503, 503)
    await statuses(stage, 2)
    for _ in range(20):
        with trio.move_on_after(1.0) as scope:
            await stage(REQUEST)
        assert scope.cancelled_caught  # Cancelled came out as Cancelled, not CircuitBreakerError
    assert stage.state == "closed"
    assert stage.stats().consecutive_failures == 2  # not a success either: the streak stands
    assert stage.stats().not_counted == 20
    upstream.then(503)
    await stage(REQUEST)
    assert stage.state == "open"


async def test_a_cancelled_probe_neither_closes_nor_reopens(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream)
    await trip(stage, upstream)
    await trio.sleep(RESET_S)
    upstream.then(Step(200, delay_s=10.0))
    with trio.move_on_after(1.0):
        await stage(REQUEST)
    assert stage.state == "half-open"
    assert stage.stats().probes_in_flight == 0  # the slot is free again
    assert (await stage(REQUEST)).status == 200  # the next call is the probe
    assert stage.state == "closed"


class ClientGone(Exception):
    """Stands in for net.server.ClientGone, which stages must not import."""


@pytest.mark.parametrize(
    "error",
    [
        ClientGone(),
        ClientError(400, "bad_request", "nope"),
        RuntimeError("a bug"),
        UpstreamPoolTimeout("pool full", upstream="billing"),
        StaleConnection("idle close", upstream="billing"),
        DeadlineExceeded("route budget spent", upstream="billing"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_non_upstream_faults_never_open_it_and_come_out_unchanged(
    autojump_clock: trio.testing.MockClock, error: Exception
) -> None:
    upstream = ScriptedUpstream(503, 503, default=Step(error=error))
    stage = make(upstream)
    await statuses(stage, 2)
    for _ in range(20):
        with pytest.raises(type(error)) as info:
            await stage(REQUEST)
        assert info.value is error
    assert stage.state == "closed"
    assert stage.stats().consecutive_failures == 2


async def test_a_non_upstream_fault_in_half_open_is_no_verdict(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ScriptedUpstream()
    stage = make(upstream)
    await trip(stage, upstream)
    await trio.sleep(RESET_S)
    upstream.then(ClientGone())
    with pytest.raises(ClientGone):
        await stage(REQUEST)
    assert stage.state == "half-open"
    assert stage.stats().probes_in_flight == 0


# -- responses, wiring, observability ------------------------------------------------------


async def test_responses_are_returned_as_is_and_never_released_here(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ScriptedUpstream(200, 404, 503, 503, 503)
    stage = make(upstream)
    returned = [await stage(REQUEST) for _ in range(5)]  # the last one trips it
    assert stage.state == "open"
    assert [r.status for r in returned] == [200, 404, 503, 503, 503]
    assert all(r is s for r, s in zip(returned, upstream.responses, strict=True))
    assert upstream.released == 0  # the caller releases what it is given


def test_maybe_breaker_builds_no_stage_when_disabled() -> None:
    upstream = ScriptedUpstream()
    assert maybe_breaker(upstream, BreakerConfig(enabled=False), "billing") is upstream
    stage = maybe_breaker(upstream, BreakerConfig(), "billing")
    assert isinstance(stage, BreakerStage)
    assert stage.name == "billing"


class Recorder(pybreaker.CircuitBreakerListener):
    """The telemetry hook: any pybreaker listener sees the transitions."""

    def __init__(self) -> None:
        self.changes: list[tuple[str | None, str]] = []

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self.changes.append((old_state.name if old_state else None, new_state.name))


async def test_state_changes_are_logged_and_reach_extra_listeners(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_ambassador.breaker")
    recorder = Recorder()
    upstream = ScriptedUpstream()
    stage = make(upstream, listeners=[recorder])
    await trip(stage, upstream)
    await trio.sleep(RESET_S)
    await stage(REQUEST)
    assert recorder.changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "resilient_ambassador.breaker"]
    assert [level for level, _ in levels] == [logging.WARNING, logging.INFO, logging.INFO]
    assert all("billing" in message for _, message in levels)
    assert "3 consecutive failures" in levels[0][1]


async def test_stats_snapshot(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ScriptedUpstream(200, 404, ClientGone())
    stage = make(upstream)
    await statuses(stage, 2)
    with pytest.raises(ClientGone):
        await stage(REQUEST)
    await trip(stage, upstream)
    await expect_open(stage)
    stats = stage.stats()
    assert stats.upstream == "billing"
    assert stats.state == "open"
    assert (stats.successes, stats.failures, stats.not_counted, stats.rejected) == (2, 3, 1, 1)
    assert stats.opened == 1
    assert stats.probes_in_flight == 0


async def test_failure_errors_choose_which_error_kinds_count(autojump_clock: trio.testing.MockClock) -> None:
    timeouts = [UpstreamTimeout("slow", upstream="billing")] * 3
    upstream = ScriptedUpstream(*timeouts, *[UpstreamConnectError("refused", upstream="billing")] * 3)
    stage = make(upstream, failure_errors=frozenset({"connect"}))

    for _ in range(3):
        with pytest.raises(UpstreamTimeout):
            await stage(REQUEST)
    assert stage.state == "closed"  # timeouts are not counted here
    for _ in range(3):
        with pytest.raises(UpstreamConnectError):
            await stage(REQUEST)
    assert stage.state == "open"
