"""RateLimitStage and QuotaStage on trio's MockClock, with in-memory buckets and a scripted
inner handler: reject and queue modes, FIFO, bounds, deadlines, descriptors, retries."""

from __future__ import annotations

import dataclasses
from collections import deque

import pytest
import trio
import trio.testing

from resilient_ambassador.core.config import QuotaConfig, RateLimitConfig, RetryConfig
from resilient_ambassador.core.errors import RateLimited, UpstreamQuotaExhausted
from resilient_ambassador.core.messages import BufferedBody, Headers, Request, Response, header_value
from resilient_ambassador.core.ratelimit import Decision, Limit
from resilient_ambassador.core.retry import RetryBudget
from resilient_ambassador.stages.ratelimit import QuotaStage, QuotaTracker, RateLimitStage
from resilient_ambassador.stages.retry import RetryStage
from resilient_ambassador.stores.ratelimit import MemoryBuckets

TEN_PER_S = RateLimitConfig(count=10, period_s=1.0, burst=2)


class Upstream:
    """Answers each call with the next scripted (status, headers), then 200; records when."""

    def __init__(self, *replies: tuple[int, Headers]) -> None:
        self.replies = deque(replies)
        self.calls: list[float] = []
        self.targets: list[bytes] = []

    async def __call__(self, request: Request) -> Response:
        self.calls.append(trio.current_time())
        self.targets.append(request.target)
        status, headers = self.replies.popleft() if self.replies else (200, [])
        return Response(status=status, headers=headers, body=BufferedBody(b"ok"))


def request(target: bytes = b"/", headers: Headers | None = None, **fields: object) -> Request:
    return Request(method=b"GET", target=target, headers=headers or [], **fields)  # type: ignore[arg-type]


def stage(upstream: Upstream, config: RateLimitConfig = TEN_PER_S, credential: str = "") -> RateLimitStage:
    return RateLimitStage(
        upstream, config, MemoryBuckets(), route="search", upstream="api", credential=lambda: credential
    )


async def test_reject_mode_answers_429_with_headers_and_never_calls_the_upstream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream()
    limiter = stage(upstream)
    first, second = request(), request()
    await limiter(first)
    await limiter(second)
    third = request()
    with pytest.raises(RateLimited) as info:
        await limiter(third)
    error = info.value
    assert (error.status, error.reason) == (429, "rate_limited")
    assert error.retry_after_s == pytest.approx(0.1)
    assert dict(error.extra_headers) == {
        b"ratelimit-policy": b'"search";q=10;w=1',
        b"ratelimit": b'"search";r=0;t=1',
    }
    assert len(upstream.calls) == 2
    assert (first.outcome.rate_limit, third.outcome.rate_limit) == ("allowed", "rejected")
    assert (limiter.stats.admitted, limiter.stats.rejected) == (2, 1)

    await trio.sleep(0.1)
    await limiter(request())  # a token is back
    assert len(upstream.calls) == 3


async def test_queue_mode_is_fifo_at_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    limiter = stage(upstream, dataclasses.replace(TEN_PER_S, burst=1, mode="queue", max_wait_s=1.0))
    requests = [request(b"/%d" % i) for i in range(5)]
    async with trio.open_nursery() as nursery:
        for r in requests:
            nursery.start_soon(limiter, r)
            await trio.testing.wait_all_tasks_blocked()  # arrive in this order
    assert upstream.targets == [b"/0", b"/1", b"/2", b"/3", b"/4"]
    assert upstream.calls == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert [r.outcome.rate_limit for r in requests] == ["allowed"] + ["queued"] * 4
    assert requests[4].outcome.rate_limit_wait_s == pytest.approx(0.4)
    stats = limiter.stats
    assert (stats.queued, stats.waiting, stats.admitted) == (4, 0, 5)
    assert stats.max_queue_wait_s == pytest.approx(0.4)


async def test_queue_rejects_at_once_past_max_wait(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    limiter = stage(upstream, dataclasses.replace(TEN_PER_S, burst=1, mode="queue", max_wait_s=0.15))
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(limiter, request())
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        with pytest.raises(RateLimited) as info:
            await limiter(request())  # its slot would be 0.2 s away
        assert trio.current_time() == started  # no waiting in vain
        assert info.value.retry_after_s == pytest.approx(0.2)


async def test_queue_length_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    limiter = stage(
        upstream, dataclasses.replace(TEN_PER_S, burst=1, mode="queue", max_wait_s=10, max_queue=2)
    )
    async with trio.open_nursery() as nursery:
        for _ in range(3):  # one goes at once, two wait
            nursery.start_soon(limiter, request())
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.stats.waiting == 2
        with pytest.raises(RateLimited):
            await limiter(request())
    assert len(upstream.calls) == 3


async def test_queue_never_waits_past_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    limiter = stage(upstream, dataclasses.replace(TEN_PER_S, burst=1, mode="queue", max_wait_s=10))
    await limiter(request())
    with trio.CancelScope(deadline=trio.current_time() + 0.05), pytest.raises(RateLimited):
        await limiter(request())  # the slot is 0.1 s away, the deadline 0.05 s
    with pytest.raises(RateLimited):
        await limiter(request(deadline=trio.current_time() + 0.05))  # a per-try deadline too
    assert len(upstream.calls) == 1


@pytest.mark.parametrize("key", ["client_ip", "header", "credential"])
async def test_descriptors_give_separate_buckets(key: str, autojump_clock: trio.testing.MockClock) -> None:
    config = dataclasses.replace(TEN_PER_S, burst=1, key=key, key_header="x-client-id")  # type: ignore[arg-type]

    def made(who: bytes) -> Request:
        return request(client_ip=who, headers=[(b"x-client-id", who)])

    upstream = Upstream()
    credentials = iter(["cred-a", "cred-a", "cred-b"])
    limiter = RateLimitStage(
        upstream, config, MemoryBuckets(), route="r", upstream="api", credential=lambda: next(credentials)
    )
    await limiter(made(b"a"))
    if key == "credential":
        with pytest.raises(RateLimited):
            await limiter(made(b"a"))  # same credential
        await limiter(made(b"a"))  # the credential rotated: a new bucket
    else:
        with pytest.raises(RateLimited):
            await limiter(made(b"a"))
        await limiter(made(b"b"))
    assert len(upstream.calls) == 2


async def test_every_retry_attempt_takes_a_token_and_a_429_of_ours_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream((503, []), (503, []))
    limiter = stage(upstream, dataclasses.replace(TEN_PER_S, burst=2))
    retry = RetryStage(
        limiter,
        RetryConfig(retries=3, backoff_base_s=0.001, backoff_max_s=0.001),
        route_timeout_s=None,
        deadline_header=None,
        budget=RetryBudget.from_config(RetryConfig(budget_min_per_s=100)),
        random=lambda: 0.0,
    )
    with pytest.raises(RateLimited):
        await retry(request())
    assert len(upstream.calls) == 2  # two tokens, two attempts; the third attempt got our 429
    assert limiter.stats.rejected == 1


# -- upstream quota ----------------------------------------------------------------------------


def quota_stage(upstream: Upstream, **fields: object) -> QuotaStage:
    config = dataclasses.replace(QuotaConfig(enabled=True), **fields)  # type: ignore[arg-type]
    return QuotaStage(upstream, QuotaTracker("api", config, wall_clock=lambda: 1_800_000_000.0))


async def test_upstream_429_with_retry_after_holds_traffic_until_then(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream((429, [(b"retry-after", b"3")]))
    held = quota_stage(upstream, max_wait_s=5.0)
    response = await held(request())
    assert response.status == 429  # the upstream's own answer goes back as is
    later = request()
    await held(later)
    assert upstream.calls == [0.0, 3.0]
    assert later.outcome.rate_limit == "quota_held"
    assert held.tracker.stats.paused == 1


async def test_reject_mode_fails_fast_with_the_upstreams_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream((429, [(b"retry-after", b"30")]))
    held = quota_stage(upstream, mode="reject")
    await held(request())
    with pytest.raises(UpstreamQuotaExhausted) as info:
        await held(request())
    assert (info.value.status, info.value.reason) == (429, "upstream_quota_exhausted")
    assert info.value.retry_after_s == pytest.approx(30.0)
    assert len(upstream.calls) == 1


async def test_low_remaining_is_paced_until_the_reset(autojump_clock: trio.testing.MockClock) -> None:
    low = [(b"x-ratelimit-limit", b"100"), (b"x-ratelimit-remaining", b"4"), (b"x-ratelimit-reset", b"8")]
    upstream = Upstream((200, low))
    held = quota_stage(upstream, max_wait_s=10.0)
    await held(request())
    for _ in range(3):
        await held(request())
    # 4 left for 8 s: one every 2 s.
    assert upstream.calls == pytest.approx([0.0, 0.0, 2.0, 4.0])
    assert header_value(low, b"x-ratelimit-remaining") == b"4"


async def test_a_quota_pause_is_not_waited_past_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream((503, [(b"retry-after", b"2")]))
    held = quota_stage(upstream, max_wait_s=10.0)
    await held(request())
    started = trio.current_time()
    with trio.CancelScope(deadline=started + 1.0), pytest.raises(UpstreamQuotaExhausted) as info:
        await held(request())
    assert trio.current_time() == started  # refused at once, not after a wait in vain
    assert info.value.retry_after_s == pytest.approx(2.0)
    await held(request(deadline=started + 5.0))  # time enough: waits the pause out
    assert upstream.calls == [0.0, 2.0]


class SlowBuckets:
    """Memory buckets that take about 10 ms to decide, like a Redis round trip; the n-th call
    decides 1 ms after the one before, so decisions keep the order of arrival."""

    def __init__(self) -> None:
        self.memory = MemoryBuckets()
        self.calls = 0

    async def acquire(self, key: str, limit: Limit, max_wait_s: float) -> Decision:
        self.calls += 1
        await trio.sleep(0.01 + 0.001 * self.calls)
        return self.memory.take(key, limit, max_wait_s)


async def test_requests_still_deciding_count_against_max_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream()
    config = dataclasses.replace(TEN_PER_S, burst=1, mode="queue", max_wait_s=10, max_queue=2)
    limiter = RateLimitStage(upstream, config, SlowBuckets(), route="r", upstream="api")
    refused: list[RateLimited] = []

    async def one() -> None:
        try:
            await limiter(request())
        except RateLimited as exc:
            refused.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):  # all three are deciding at once; the third finds no queue place
            nursery.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
    assert len(refused) == 1
    assert upstream.calls == pytest.approx([0.011, 0.111])
