"""The retry stage against a scripted in-memory upstream, on trio's MockClock: every backoff,
Retry-After and deadline is checked on the virtual clock, with no wall-clock wait."""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from resilient_ambassador.core.config import RetryConfig
from resilient_ambassador.core.errors import (
    BreakerOpen,
    ClientError,
    DeadlineExceeded,
    ProxyError,
    StaleConnection,
    UpstreamConnectError,
    UpstreamDNSError,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
)
from resilient_ambassador.core.messages import Body, BufferedBody, Headers, Request, Response, header_value
from resilient_ambassador.core.retry import RETRY_AFTER_CAP_S, RetryBudget
from resilient_ambassador.stages.retry import RetryStage

DEADLINE_HEADER = b"x-request-timeout"


@dataclass(frozen=True)
class Step:
    """One scripted upstream outcome: a response (`status`, `headers`) or `error`, after
    `delay_s`."""

    status: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()
    error: BaseException | None = None
    delay_s: float = 0.0


@dataclass(frozen=True)
class Seen:
    """A request as the upstream received it."""

    method: bytes
    target: bytes
    headers: Headers
    body: bytes
    body_object: Body
    at: float


@dataclass
class ScriptedUpstream:
    """In-memory inner handler: plays `steps` in order, then `default`; records each request
    and which of the responses it handed out were released."""

    steps: deque[Step]
    default: Step = Step(200)
    seen: list[Seen] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    released: list[int] = field(default_factory=list)  # indexes into `responses`

    async def __call__(self, request: Request) -> Response:
        at = trio.current_time()
        body = b"".join([chunk async for chunk in request.body])
        self.seen.append(Seen(request.method, request.target, list(request.headers), body, request.body, at))
        step = self.steps.popleft() if self.steps else self.default
        if step.delay_s:
            # Like the real upstream client: an attempt deadline is enforced here, inside.
            with trio.move_on_at(request.deadline):
                await trio.sleep(step.delay_s)
            if trio.current_time() >= request.deadline:
                raise UpstreamTimeout("no response within the per-try timeout", upstream="up")
        if step.error is not None:
            raise step.error
        index = len(self.responses)
        response = Response(
            status=step.status,
            headers=list(step.headers),
            body=BufferedBody(b"answer %d" % index),
            release=lambda: self.released.append(index),
        )
        self.responses.append(response)
        return response

    @property
    def calls(self) -> int:
        return len(self.seen)

    def gaps(self) -> list[float]:
        """Time between the starts of consecutive attempts."""
        return [b.at - a.at for a, b in zip(self.seen, self.seen[1:], strict=False)]


def upstream(
    *steps: Step | int | BaseException, default: Step | int | BaseException = 200
) -> ScriptedUpstream:
    return ScriptedUpstream(deque(_step(s) for s in steps), _step(default))


def _step(s: Step | int | BaseException) -> Step:
    if isinstance(s, Step):
        return s
    if isinstance(s, int):
        return Step(s)
    return Step(error=s)


@dataclass
class StreamedBody:
    """A client body as the server hands it over (like `DownstreamBody`): iterated once, not
    replayable; `length` None for chunked. Raises `error` after its chunks, if given."""

    chunks: list[bytes]
    chunked: bool = False
    error: Exception | None = None
    iterations: int = 0

    @property
    def length(self) -> int | None:
        return None if self.chunked else sum(map(len, self.chunks))

    @property
    def replayable(self) -> bool:
        return False

    def ready(self) -> bool:
        return False

    def __aiter__(self) -> AsyncIterator[bytes]:
        self.iterations += 1
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        if self.iterations > 1:
            raise AssertionError("a streamed body was iterated twice")
        for chunk in self.chunks:
            await trio.lowlevel.checkpoint()
            yield chunk
        if self.error is not None:
            raise self.error


def stage(
    inner: ScriptedUpstream,
    *,
    route_timeout_s: float | None = None,
    deadline_header: bytes | None = DEADLINE_HEADER,
    budget: RetryBudget | None = None,
    draw: Callable[[], float] = lambda: 0.5,
    **retry: Any,
) -> RetryStage:
    config = RetryConfig(**retry)
    return RetryStage(
        inner,
        config,
        route_timeout_s=route_timeout_s,
        deadline_header=deadline_header,
        budget=budget or RetryBudget.from_config(config),
        random=draw,
        upstream="up",
    )


def get(*headers: tuple[bytes, bytes], method: bytes = b"GET", body: Body | None = None) -> Request:
    return Request(
        method=method,
        target=b"/v1/items?token=t",
        headers=[(b"host", b"api"), *headers],
        body=BufferedBody() if body is None else body,
    )


def retry_after(value: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"retry-after", value),)


# -- what is retried ---------------------------------------------------------------------------


async def test_503_then_200_is_retried_and_the_503_released(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(503, 200)

    response = await stage(up)(get())

    assert response.status == 200
    assert response is up.responses[1]
    assert up.released == [0]  # the dropped 503 went back; the answer is the caller's to release
    assert [s.target for s in up.seen] == [b"/v1/items?token=t"] * 2


@pytest.mark.parametrize(
    "error",
    [
        UpstreamConnectError("refused"),
        UpstreamDNSError("nxdomain"),
        UpstreamTLSError("bad certificate"),
        UpstreamTimeout("no response"),
        UpstreamProtocolError("reset before the head"),
        StaleConnection("closed by peer"),
    ],
)
async def test_upstream_failures_are_retried(
    autojump_clock: trio.testing.MockClock, error: UpstreamError
) -> None:
    up = upstream(error, 200)

    response = await stage(up)(get())

    assert response.status == 200
    assert up.calls == 2


class _RateLimited(ProxyError):
    """The local rate limiter's answer: decided here, never the upstream's."""

    status = 429
    reason = "rate_limited"


@pytest.mark.parametrize(
    "error",
    [
        BreakerOpen("circuit open"),
        _RateLimited("local quota"),
        UpstreamPoolTimeout("no free connection"),
        DeadlineExceeded("an inner deadline"),
        ClientError(413, "body_too_large", "too large"),
    ],
)
async def test_local_decisions_are_never_retried(
    autojump_clock: trio.testing.MockClock, error: ProxyError
) -> None:
    up = upstream(error, 200)

    with pytest.raises(ProxyError) as caught:
        await stage(up, retries=3)(get())

    assert caught.value is error
    assert up.calls == 1


@pytest.mark.parametrize("method", [b"POST", b"PATCH", b"get"])
async def test_methods_not_configured_are_not_retried(
    autojump_clock: trio.testing.MockClock, method: bytes
) -> None:
    up = upstream(503, 200)

    response = await stage(up, retries=3)(get(method=method))

    assert response.status == 503
    assert up.calls == 1
    assert up.released == []


async def test_methods_are_configurable(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(503, 200)

    response = await stage(up, methods=frozenset({"POST"}))(get(method=b"POST", body=StreamedBody([b"x"])))

    assert response.status == 200
    assert [s.body for s in up.seen] == [b"x", b"x"]


async def test_statuses_are_configurable(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(500, 503)

    response = await stage(up, retries=3, on_statuses=frozenset({500}))(get())

    assert response.status == 503  # not in on_statuses and no Retry-After: final
    assert up.calls == 2


async def test_retries_exhausted_returns_the_last_failure_as_is(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up = upstream(502, 504, 503, 200)

    response = await stage(up, retries=2)(get())

    assert response is up.responses[2]
    assert response.status == 503
    assert up.released == [0, 1]


async def test_the_last_error_is_reraised(autojump_clock: trio.testing.MockClock) -> None:
    last = UpstreamConnectError("still refused")
    up = upstream(UpstreamConnectError("refused"), last)

    with pytest.raises(UpstreamConnectError) as caught:
        await stage(up, retries=1)(get())

    assert caught.value is last


async def test_no_retries_configured(autojump_clock: trio.testing.MockClock) -> None:
    body = StreamedBody([b"abc"])
    up = upstream(503, 200)

    response = await stage(up, retries=0)(get(method=b"PUT", body=body))

    assert response.status == 503
    assert up.seen[0].body_object is body  # nothing buffered when nothing can be retried


# -- request bodies ----------------------------------------------------------------------------


async def test_small_body_is_buffered_and_replayed_identically(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = StreamedBody([b"first,", b"second,", b"third"])
    up = upstream(503, UpstreamConnectError("refused"), 200)

    response = await stage(up, retries=2, buffer_body_bytes=64)(get(method=b"PUT", body=body))

    assert response.status == 200
    assert [s.body for s in up.seen] == [b"first,second,third"] * 3
    assert body.iterations == 1
    assert all(s.body_object.replayable for s in up.seen)


async def test_body_at_the_limit_is_buffered(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(503, 200)

    response = await stage(up, buffer_body_bytes=4)(get(method=b"PUT", body=StreamedBody([b"ab", b"cd"])))

    assert response.status == 200
    assert [s.body for s in up.seen] == [b"abcd", b"abcd"]


async def test_body_over_the_limit_is_streamed_and_never_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = StreamedBody([b"x" * 40, b"y" * 40])
    up = upstream(503, 200)

    response = await stage(up, buffer_body_bytes=64)(get(method=b"PUT", body=body))

    assert response.status == 503
    assert up.calls == 1
    assert up.seen[0].body_object is body  # a known length over the limit: not read before
    assert up.seen[0].body == b"x" * 40 + b"y" * 40


async def test_chunked_body_within_the_limit_is_buffered(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(503, 200)

    body = StreamedBody([b"a" * 30, b"b" * 30], chunked=True)
    response = await stage(up, buffer_body_bytes=64)(get(method=b"PUT", body=body))

    assert response.status == 200
    assert [s.body for s in up.seen] == [b"a" * 30 + b"b" * 30] * 2


async def test_chunked_body_over_the_limit_streams_whole_and_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    chunks = [b"a" * 30, b"b" * 30, b"c" * 30, b"d" * 30]
    up = upstream(503, 200)

    response = await stage(up, buffer_body_bytes=64)(
        get(method=b"PUT", body=StreamedBody(chunks, chunked=True))
    )

    assert response.status == 503
    assert up.calls == 1
    sent = up.seen[0]
    assert sent.body == b"".join(chunks)  # the prefix read while deciding, then the rest
    assert sent.body_object.length is None
    assert not sent.body_object.replayable


async def test_a_replayable_body_is_used_as_is(autojump_clock: trio.testing.MockClock) -> None:
    body = BufferedBody(b"{}")
    up = upstream(503, 200)

    await stage(up, buffer_body_bytes=1)(get(method=b"PUT", body=body))

    assert [s.body_object for s in up.seen] == [body, body]


async def test_client_body_errors_propagate_untouched(autojump_clock: trio.testing.MockClock) -> None:
    error = ClientError(408, "request_timeout", "request body timeout")
    up = upstream(200)

    with pytest.raises(ClientError) as caught:
        await stage(up)(get(method=b"PUT", body=StreamedBody([b"part"], chunked=True, error=error)))

    assert caught.value is error
    assert up.calls == 0


# -- backoff and Retry-After -------------------------------------------------------------------


async def test_backoff_is_exponential_with_full_jitter(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(default=503)

    await stage(up, retries=5, backoff_base_s=0.1, backoff_max_s=0.3, draw=lambda: 0.5)(get())

    assert up.gaps() == pytest.approx([0.05, 0.1, 0.15, 0.15, 0.15])


@pytest.mark.parametrize("seed", range(5))
async def test_backoff_delays_fall_in_the_jittered_range(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    up = upstream(default=UpstreamConnectError("refused"))

    with pytest.raises(UpstreamConnectError):
        await stage(up, retries=6, backoff_base_s=0.1, backoff_max_s=1.0, draw=random.Random(seed).random)(
            get()
        )

    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(0.0 <= gap < ceiling for gap, ceiling in zip(up.gaps(), ceilings, strict=True))


async def test_retry_after_replaces_the_backoff(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(Step(503, retry_after(b"2")), Step(429, retry_after(b"1")), 200)

    response = await stage(up, retries=2, route_timeout_s=10.0)(get())

    assert response.status == 200
    assert up.gaps() == pytest.approx([2.0, 1.0])
    assert up.released == [0, 1]


async def test_retry_after_as_a_past_date_retries_at_once(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(Step(429, retry_after(b"Sun, 06 Nov 1994 08:49:37 GMT")), 200)

    response = await stage(up)(get())

    assert response.status == 200
    assert up.gaps() == [0.0]


async def test_429_without_retry_after_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(429, Step(429, retry_after(b"soon")), 200)

    assert (await stage(up)(get())).status == 429
    assert (await stage(up)(get())).status == 429  # an invalid Retry-After is no Retry-After
    assert up.calls == 2


async def test_retry_after_ignored_when_not_respected(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(Step(503, retry_after(b"5")), 200, Step(429, retry_after(b"1")), 200)
    retrying = stage(up, respect_retry_after=False, backoff_base_s=0.1)

    assert (await retrying(get())).status == 200
    assert up.gaps() == pytest.approx([0.05])  # the backoff, not the 5 s
    assert (await retrying(get())).status == 429


async def test_retry_after_longer_than_the_deadline_passes_the_answer_through_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up = upstream(Step(503, retry_after(b"30")), 200)
    start = trio.current_time()

    response = await stage(up, route_timeout_s=5.0)(get())

    assert trio.current_time() == start
    assert response is up.responses[0]
    assert header_value(response.headers, b"retry-after") == b"30"  # the client can wait itself
    assert up.released == []
    assert up.calls == 1


async def test_retry_after_beyond_the_cap_without_a_deadline_passes_through(
    autojump_clock: trio.testing.MockClock,
) -> None:
    too_long = str(int(RETRY_AFTER_CAP_S) + 1).encode()
    up = upstream(Step(429, retry_after(too_long)), 200)
    start = trio.current_time()

    response = await stage(up)(get())

    assert (response.status, trio.current_time() - start, up.calls) == (429, 0.0, 1)


# -- timeouts and the deadline -------------------------------------------------------------------


async def test_per_try_timeouts_are_retried_then_answered_504(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(default=Step(200, delay_s=10.0))
    start = trio.current_time()

    with pytest.raises(UpstreamTimeout) as caught:
        await stage(up, retries=2, per_try_timeout_s=1.0, draw=lambda: 0.0)(get())

    error = caught.value
    assert type(error) is UpstreamTimeout
    assert (error.status, error.reason, error.upstream) == (504, "upstream_timeout", "up")
    assert "per-try" in error.message
    assert up.calls == 3
    assert trio.current_time() - start == pytest.approx(3.0)
    assert up.responses == []


async def test_a_slow_first_try_is_cut_and_retried(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(Step(200, delay_s=10.0), Step(200, delay_s=0.5))
    start = trio.current_time()

    response = await stage(up, per_try_timeout_s=1.0, draw=lambda: 0.0)(get())

    assert response.status == 200
    assert trio.current_time() - start == pytest.approx(1.5)


async def test_per_try_timeout_does_not_cut_a_request_that_cannot_be_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up = upstream(Step(200, delay_s=5.0))

    response = await stage(up, per_try_timeout_s=1.0)(get(method=b"POST"))

    assert response.status == 200


async def test_the_deadline_bounds_a_single_try(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(default=Step(200, delay_s=10.0))
    start = trio.current_time()

    with pytest.raises(DeadlineExceeded) as caught:
        await stage(up, route_timeout_s=1.0)(get(method=b"POST"))

    assert (caught.value.status, caught.value.reason) == (504, "deadline_exceeded")
    assert trio.current_time() - start == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("default", "retry"),
    [
        (Step(200, delay_s=5.0), {"per_try_timeout_s": 0.7}),  # slow: per-try cuts, deadline ends
        (Step(503, delay_s=0.3), {}),  # slow failures
        (Step(503), {"backoff_base_s": 0.5, "backoff_max_s": 5.0}),  # long backoffs
        (Step(error=UpstreamConnectError("refused")), {"backoff_base_s": 0.2}),
        (Step(503, retry_after(b"1")), {}),
    ],
)
async def test_the_overall_deadline_is_never_exceeded(
    autojump_clock: trio.testing.MockClock, default: Step, retry: dict[str, Any]
) -> None:
    up = upstream(default=default)
    start = trio.current_time()

    try:
        outcome: object = await stage(up, retries=50, route_timeout_s=2.0, draw=lambda: 0.999, **retry)(get())
    except ProxyError as exc:
        outcome = exc

    assert trio.current_time() - start <= 2.0
    assert up.calls > 1
    assert all(s.at - start < 2.0 for s in up.seen)
    assert isinstance(outcome, Response | DeadlineExceeded | UpstreamTimeout | UpstreamConnectError)


@pytest.mark.parametrize(
    ("route_timeout_s", "asked", "deadline_s"),
    [
        (10.0, b"1s", 1.0),  # shortens
        (10.0, b"250ms", 0.25),
        (1.0, b"30s", 1.0),  # never lengthens
        (None, b"2", 2.0),  # bare seconds; a deadline where the route had none
        (3.0, b"soon", 3.0),  # invalid: ignored
        (None, b"-1s", None),
        (None, b"1e3", None),
        (None, "2\u00a0s".encode(), None),  # not ASCII
    ],
)
async def test_the_deadline_header_shortens_never_lengthens_and_is_stripped(
    autojump_clock: trio.testing.MockClock,
    route_timeout_s: float | None,
    asked: bytes,
    deadline_s: float | None,
) -> None:
    up = upstream(Step(200, delay_s=5.0))
    retrying = stage(up, route_timeout_s=route_timeout_s)
    start = trio.current_time()

    if deadline_s is None:
        assert (await retrying(get((b"x-request-timeout", asked)))).status == 200
        deadline_s = 5.0
    else:
        with pytest.raises(DeadlineExceeded):
            await retrying(get((b"x-request-timeout", asked)))

    assert trio.current_time() - start == pytest.approx(deadline_s)
    assert up.seen[0].headers == [(b"host", b"api")]


async def test_the_smallest_of_repeated_deadline_headers_wins(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(Step(200, delay_s=5.0))
    start = trio.current_time()

    with pytest.raises(DeadlineExceeded):
        await stage(up)(get((b"x-request-timeout", b"3s"), (b"x-request-timeout", b"2s")))

    assert trio.current_time() - start == pytest.approx(2.0)
    assert up.seen[0].headers == [(b"host", b"api")]


async def test_without_a_deadline_header_name_the_header_is_just_a_header(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up = upstream(Step(200, delay_s=5.0))

    response = await stage(up, deadline_header=None)(get((b"x-request-timeout", b"1s")))

    assert response.status == 200
    assert (b"x-request-timeout", b"1s") in up.seen[0].headers


# -- the budget -------------------------------------------------------------------------------


async def test_the_budget_caps_retries_under_a_storm(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(default=503)
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10.0)  # floor: 10 retries
    retrying = stage(up, retries=3, budget=budget)
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await retrying(get())).status)

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(one)

    retries = up.calls - 100
    assert statuses == [503] * 100
    assert 0 < retries <= max(10, 0.2 * 100)  # without a budget: 300
    assert sorted(up.released) == sorted(set(up.released))  # each dropped response once
    assert len(up.released) == retries


async def test_an_empty_budget_means_no_retry(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(503, 200)

    response = await stage(up, budget=RetryBudget(ratio=0.0, min_per_s=0.0, window_s=10.0))(get())

    assert response.status == 503
    assert up.released == []


async def test_every_request_and_retry_is_recorded(autojump_clock: trio.testing.MockClock) -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=3.0, window_s=10.0)
    up = upstream(503, 200, 200)
    retrying = stage(up, budget=budget)

    await retrying(get())
    await retrying(get(method=b"POST"))

    now = trio.current_time()
    assert (budget.requests(now), budget.retries(now)) == (2, 1)


# -- cancellation and logging -----------------------------------------------------------------


async def test_cancellation_during_backoff_propagates(autojump_clock: trio.testing.MockClock) -> None:
    up = upstream(503, 200)

    with trio.move_on_after(0.1) as scope:
        await stage(up, backoff_base_s=10.0, backoff_max_s=10.0)(get())

    assert scope.cancelled_caught
    assert up.calls == 1
    assert up.released == [0]


async def test_cancellation_during_a_try_is_not_a_per_try_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up = upstream(default=Step(200, delay_s=10.0))

    with trio.move_on_after(0.5) as scope:
        await stage(up, per_try_timeout_s=1.0, route_timeout_s=5.0)(get())

    assert scope.cancelled_caught
    assert up.calls == 1


async def test_each_retry_is_logged_at_debug(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_ambassador.retry")
    up = upstream(503, UpstreamConnectError("refused"), 200)

    await stage(up, retries=2, backoff_base_s=0.1)(get())

    messages = [r.getMessage() for r in caplog.records if r.name == "resilient_ambassador.retry"]
    assert messages == [
        "retrying GET /v1/items: attempt 1 failed (status_503), attempt 2 in 0.050s",
        "retrying GET /v1/items: attempt 2 failed (upstream_connect_failed), attempt 3 in 0.100s",
    ]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "resilient_ambassador.retry")
