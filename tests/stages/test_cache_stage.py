"""The cache stage against a scripted in-memory upstream on trio's MockClock: hits, ages,
revalidation, stale serving, coalescing and streaming, with no wall-clock wait."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_ambassador.core.config import RouteCacheConfig
from resilient_ambassador.core.errors import BreakerOpen, ClientError, ProxyError, UpstreamConnectError
from resilient_ambassador.core.messages import BufferedBody, Headers, Request, Response, header_value
from resilient_ambassador.stages.cache import CacheStage, CacheStats
from resilient_ambassador.stores.cache_memory import MemoryCacheStore

BASE = 1_700_000_000.0
ON = RouteCacheConfig(enabled=True)


def wall() -> float:
    return BASE + trio.current_time()


class StreamedBody:
    """A body that arrives in chunks, optionally failing after some."""

    def __init__(self, chunks: list[bytes], fail_after: int | None = None, length: int | None = None) -> None:
        self._chunks = deque(chunks)
        self._fail_after = fail_after
        self._sent = 0
        self._length = length

    @property
    def length(self) -> int | None:
        return self._length

    @property
    def replayable(self) -> bool:
        return False

    def ready(self) -> bool:
        return True

    def __aiter__(self) -> StreamedBody:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self._fail_after is not None and self._sent >= self._fail_after:
            raise UpstreamConnectError("reset mid-body")
        if not self._chunks:
            raise StopAsyncIteration
        self._sent += 1
        return self._chunks.popleft()


Step = Callable[[Request], Response] | ProxyError


@dataclass
class Upstream:
    """Plays `steps` in order, then `default`; records the requests it saw."""

    steps: deque[Step] = field(default_factory=deque)
    default: Step | None = None
    delay_s: float = 0.0
    seen: list[Request] = field(default_factory=list)
    released: int = 0

    def script(self, *steps: Step) -> None:
        self.steps.extend(steps)

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        if self.delay_s:
            await trio.sleep(self.delay_s)
        step = self.steps.popleft() if self.steps else self.default
        assert step is not None, "unscripted upstream call"
        if isinstance(step, ProxyError):
            raise step
        response = step(request)

        def release() -> None:
            self.released += 1

        response.release = release
        return response


def reply(status: int = 200, body: bytes = b"fresh", **headers: str) -> Callable[[Request], Response]:
    hdrs: Headers = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]

    def make(_: Request) -> Response:
        return Response(status, [*hdrs, (b"content-length", str(len(body)).encode())], BufferedBody(body))

    return make


async def read(response: Response) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.body])
    finally:
        response.release()


def get(target: bytes = b"/a", *headers: tuple[bytes, bytes], method: bytes = b"GET") -> Request:
    return Request(method=method, target=target, headers=list(headers))


def status_of(response: Response) -> str:
    value = header_value(response.headers, b"cache-status")
    assert value is not None
    return value.decode()


@dataclass
class Rig:
    upstream: Upstream
    stage: CacheStage
    store: MemoryCacheStore

    async def fetch(self, request: Request | None = None) -> tuple[Response, bytes]:
        response = await self.stage(request or get())
        return response, await read(response)


@pytest.fixture
async def rig(nursery: trio.Nursery) -> Rig:
    upstream = Upstream()
    store = MemoryCacheStore(1 << 20, clock=wall)
    stage = CacheStage(upstream, ON, store, route="r", authority=b"api.example", clock=wall)
    await nursery.start(stage.run)
    return Rig(upstream, stage, store)


def configure(rig: Rig, **fields: object) -> None:
    config = dataclasses.replace(ON, **fields)  # type: ignore[arg-type]
    rig.stage = CacheStage(rig.upstream, config, rig.store, route="r", authority=b"api.example", clock=wall)


async def test_miss_then_hit_with_age(autojump_clock: trio.testing.MockClock, rig: Rig) -> None:
    rig.upstream.script(reply(body=b"one", cache_control="max-age=60"))
    first, body = await rig.fetch()
    assert (body, status_of(first)) == (b"one", "resilient-ambassador; fwd=uri-miss; stored")
    await trio.sleep(10)
    second, body = await rig.fetch()
    assert body == b"one"
    assert status_of(second) == "resilient-ambassador; hit; ttl=50"
    assert header_value(second.headers, b"age") == b"10"
    assert len(rig.upstream.seen) == 1
    assert rig.stage.stats.hits == 1


async def test_revalidation_with_etag_and_304(autojump_clock: trio.testing.MockClock, rig: Rig) -> None:
    rig.upstream.script(
        reply(body=b"v1", cache_control="max-age=1", etag='"v1"', x_a="old"),
        reply(304, b"", cache_control="max-age=100", x_a="new"),
    )
    await rig.fetch(get(b"/a", (b"if-none-match", b'"client"')))
    await trio.sleep(2)
    response, body = await rig.fetch()
    seen = rig.upstream.seen
    assert header_value(seen[0].headers, b"if-none-match") is None  # miss: client's own stripped
    assert header_value(seen[1].headers, b"if-none-match") == b'"v1"'
    assert (response.status, body) == (200, b"v1")
    assert header_value(response.headers, b"x-a") == b"new"
    assert status_of(response) == "resilient-ambassador; fwd=stale; fwd-status=304; ttl=100; stored"
    again, _ = await rig.fetch()
    assert status_of(again).startswith("resilient-ambassador; hit")
    assert rig.stage.stats.revalidated == 1


async def test_client_no_cache_revalidates_only_when_respected(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    rig.upstream.default = reply(body=b"v", cache_control="max-age=60", etag='"v"')
    await rig.fetch()
    ignored, _ = await rig.fetch(get(b"/a", (b"cache-control", b"no-cache")))
    assert status_of(ignored).startswith("resilient-ambassador; hit")
    configure(rig, respect_client_no_cache=True)
    rig.upstream.script(reply(304, b"", cache_control="max-age=60"))
    respected, body = await rig.fetch(get(b"/a", (b"cache-control", b"max-age=0")))
    assert body == b"v"
    assert "fwd=request; fwd-status=304" in status_of(respected)
    assert len(rig.upstream.seen) == 2


async def test_clients_conditional_gets_304_from_the_cache(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    rig.upstream.script(reply(body=b"v1", cache_control="max-age=60", etag='"v1"'))
    first, body = await rig.fetch(get(b"/a", (b"if-none-match", b'"v1"')))
    assert (first.status, body) == (304, b"")  # answered by us on the miss as well
    second, body = await rig.fetch(get(b"/a", (b"if-none-match", b'W/"v1"')))
    assert (second.status, body) == (304, b"")
    assert header_value(second.headers, b"etag") == b'"v1"'
    third, body = await rig.fetch(get(b"/a", (b"if-none-match", b'"v0"')))
    assert (third.status, body) == (200, b"v1")
    assert len(rig.upstream.seen) == 1


async def test_conditionals_never_turn_an_error_into_304(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    rig.upstream.script(reply(404, b"gone", cache_control="max-age=60"))
    first, _ = await rig.fetch(get(b"/a", (b"if-none-match", b"*")))
    second, body = await rig.fetch(get(b"/a", (b"if-none-match", b"*")))
    assert (first.status, second.status, body) == (404, 404, b"gone")
    assert status_of(second).startswith("resilient-ambassador; hit")


async def test_stale_while_revalidate_serves_at_once_and_refreshes_once(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    rig.upstream.script(reply(body=b"old", cache_control="max-age=1, stale-while-revalidate=30"))
    await rig.fetch()
    rig.upstream.delay_s = 5.0
    rig.upstream.default = reply(body=b"new", cache_control="max-age=60")
    await trio.sleep(2)
    started = trio.current_time()
    answers = [await rig.fetch() for _ in range(3)]
    assert trio.current_time() == started  # nobody waited for the upstream
    assert [body for _, body in answers] == [b"old"] * 3
    assert "detail=stale-while-revalidate" in status_of(answers[0][0])
    await trio.sleep(6)
    _, body = await rig.fetch()
    assert body == b"new"
    assert len(rig.upstream.seen) == 2  # one miss, one background refresh
    assert rig.stage.stats.background_refreshes == 1


@pytest.mark.parametrize(
    "failure",
    [UpstreamConnectError("refused"), BreakerOpen("open"), reply(503, b"down")],
    ids=["connect", "breaker", "503"],
)
async def test_stale_if_error_serves_the_stale_copy_without_another_call(
    autojump_clock: trio.testing.MockClock, rig: Rig, failure: Step
) -> None:
    rig.upstream.script(reply(body=b"good", cache_control="max-age=1, stale-if-error=60"), failure)
    await rig.fetch()
    await trio.sleep(5)
    response, body = await rig.fetch()
    assert (response.status, body) == (200, b"good")
    assert "fwd=stale" in status_of(response)
    assert "detail=stale-if-error" in status_of(response)
    assert header_value(response.headers, b"age") == b"5"
    assert len(rig.upstream.seen) == 2
    assert rig.stage.stats.stale_if_error == 1


async def test_client_errors_are_not_covered_by_a_stale_copy(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    rig.upstream.script(
        reply(body=b"good", cache_control="max-age=1, stale-if-error=600"),
        ClientError(408, "request_timeout", "request body timeout"),
    )
    await rig.fetch()
    await trio.sleep(2)
    with pytest.raises(ClientError):
        await rig.fetch()


async def test_stale_if_error_window_from_config_and_its_end(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    configure(rig, stale_if_error_s=10.0, default_ttl_s=1.0)
    rig.upstream.script(reply(body=b"good"), UpstreamConnectError("refused"), UpstreamConnectError("refused"))
    await rig.fetch()
    await trio.sleep(5)
    _, body = await rig.fetch()
    assert body == b"good"
    await trio.sleep(10)
    with pytest.raises(UpstreamConnectError):
        await rig.fetch()


async def test_must_revalidate_is_never_served_stale(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    configure(rig, stale_if_error_s=60.0)
    rig.upstream.script(reply(body=b"x", cache_control="max-age=1, must-revalidate"), reply(503))
    await rig.fetch()
    await trio.sleep(2)
    response, _ = await rig.fetch()
    assert response.status == 503


async def test_concurrent_misses_make_one_upstream_request(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    rig.upstream.delay_s = 1.0
    rig.upstream.default = reply(body=b"shared", cache_control="max-age=60")
    bodies: list[bytes] = []

    async def one() -> None:
        bodies.append((await rig.fetch())[1])

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert bodies == [b"shared"] * 5
    assert len(rig.upstream.seen) == 1
    assert rig.stage.stats.collapsed == 4


async def test_concurrent_stale_requests_make_one_revalidation(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    rig.upstream.script(
        reply(body=b"v1", cache_control="max-age=1", etag='"v1"'),
        reply(304, b"", cache_control="max-age=60"),
    )
    await rig.fetch()
    await trio.sleep(2)
    rig.upstream.delay_s = 1.0
    bodies: list[bytes] = []

    async def one() -> None:
        bodies.append((await rig.fetch())[1])

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
    assert bodies == [b"v1"] * 4
    assert len(rig.upstream.seen) == 2


@pytest.mark.parametrize("failure", [UpstreamConnectError("refused"), reply(503)], ids=["error", "503"])
async def test_a_failed_revalidation_serves_every_waiter_stale_without_asking_again(
    autojump_clock: trio.testing.MockClock, rig: Rig, failure: Step
) -> None:
    rig.upstream.script(reply(body=b"good", cache_control="max-age=1, stale-if-error=600"), failure)
    await rig.fetch()
    await trio.sleep(2)
    rig.upstream.delay_s = 1.0
    answers: list[Response] = []

    async def one() -> None:
        response = await rig.stage(get())
        answers.append(response)
        await read(response)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert [a.status for a in answers] == [200] * 5
    assert all("stale-if-error" in status_of(a) for a in answers)
    assert len(rig.upstream.seen) == 2  # the first fetch and one failed revalidation


async def test_coalescing_wait_is_bounded(autojump_clock: trio.testing.MockClock, rig: Rig) -> None:
    configure(rig, coalesce_wait_s=1.0)
    rig.upstream.delay_s = 3.0
    rig.upstream.default = reply(body=b"slow", cache_control="max-age=60")
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(rig.fetch)
    assert len(rig.upstream.seen) == 3  # the waiters gave up after 1 s and went themselves


async def test_uncacheable_leader_releases_the_waiters(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    rig.upstream.delay_s = 1.0
    rig.upstream.default = reply(body=b"private", cache_control="private")
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(rig.fetch)
    assert len(rig.upstream.seen) == 3
    assert trio.current_time() < 2.5  # they did not wait out the coalescing bound


async def test_large_body_streams_through_and_is_not_stored(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    configure(rig, max_object_bytes=10)
    chunks = [b"x" * 8] * 4

    def big(_: Request) -> Response:
        return Response(200, [(b"cache-control", b"max-age=60")], StreamedBody(list(chunks)))

    rig.upstream.script(big, big)
    _, body = await rig.fetch()
    assert body == b"x" * 32
    _, body = await rig.fetch()
    assert len(rig.upstream.seen) == 2
    assert rig.store.stats.entries == 0


async def test_body_failing_midway_leaves_no_entry(autojump_clock: trio.testing.MockClock, rig: Rig) -> None:
    def broken(_: Request) -> Response:
        return Response(200, [(b"cache-control", b"max-age=60")], StreamedBody([b"a", b"b"], fail_after=1))

    rig.upstream.script(broken, reply(body=b"whole", cache_control="max-age=60"))
    response = await rig.stage(get())
    with pytest.raises(UpstreamConnectError):
        await read(response)
    _, body = await rig.fetch()
    assert body == b"whole"


async def test_client_gone_midway_leaves_no_entry(autojump_clock: trio.testing.MockClock, rig: Rig) -> None:
    rig.upstream.script(
        lambda _: Response(200, [(b"cache-control", b"max-age=60")], StreamedBody([b"a", b"b"])),
        reply(body=b"whole", cache_control="max-age=60"),
    )
    response = await rig.stage(get())
    await anext(aiter(response.body))
    response.release()  # what the server does when the client disconnects
    _, body = await rig.fetch()
    assert body == b"whole"


async def test_unsafe_methods_invalidate_on_success_only(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    rig.upstream.default = reply(body=b"v", cache_control="max-age=60")
    await rig.fetch(get(b"/a"))
    await rig.fetch(get(b"/b"))
    rig.upstream.script(reply(500), reply(201, location="https://api.example/b"))
    await rig.fetch(get(b"/a", method=b"POST"))
    assert status_of((await rig.fetch(get(b"/a")))[0]).startswith("resilient-ambassador; hit")
    posted, _ = await rig.fetch(get(b"/a", method=b"POST"))
    assert status_of(posted) == "resilient-ambassador; fwd=method"
    assert "fwd=uri-miss" in status_of((await rig.fetch(get(b"/a")))[0])
    assert "fwd=uri-miss" in status_of((await rig.fetch(get(b"/b")))[0])


async def test_head_is_served_from_a_stored_get_never_the_reverse(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    rig.upstream.default = reply(body=b"body", cache_control="max-age=60")
    head, body = await rig.fetch(get(method=b"HEAD"))
    assert "detail=method" in status_of(head)
    await rig.fetch(get())
    head, body = await rig.fetch(get(method=b"HEAD"))
    assert body == b""
    assert header_value(head.headers, b"content-length") == b"4"
    assert status_of(head).startswith("resilient-ambassador; hit")
    assert len(rig.upstream.seen) == 2


@pytest.mark.parametrize(
    ("headers", "request_headers", "detail"),
    [
        ({"cache_control": "max-age=60", "set_cookie": "s=1"}, [], "set-cookie"),
        ({"cache_control": "max-age=60"}, [(b"authorization", b"Bearer u")], "authorization"),
        ({"cache_control": "no-store"}, [], "no-store"),
        ({"cache_control": "private, max-age=60"}, [], "private"),
    ],
)
async def test_not_stored_says_why(
    autojump_clock: trio.testing.MockClock,
    rig: Rig,
    headers: dict[str, str],
    request_headers: list[tuple[bytes, bytes]],
    detail: str,
) -> None:
    rig.upstream.default = reply(200, b"ok", **headers)
    first, _ = await rig.fetch(get(b"/a", *request_headers))
    await rig.fetch(get(b"/a", *request_headers))
    assert status_of(first) == f"resilient-ambassador; fwd=uri-miss; detail={detail}"
    assert len(rig.upstream.seen) == 2


async def test_authorization_request_is_not_answered_from_a_plain_entry(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    rig.upstream.default = reply(body=b"anon", cache_control="max-age=60")
    await rig.fetch()
    response, _ = await rig.fetch(get(b"/a", (b"authorization", b"Bearer u")))
    assert "fwd=vary-miss" in status_of(response)
    assert len(rig.upstream.seen) == 2


async def test_vary_mismatch_is_a_miss(autojump_clock: trio.testing.MockClock, rig: Rig) -> None:
    rig.upstream.default = reply(cache_control="max-age=60", vary="Accept-Encoding")
    await rig.fetch(get(b"/a", (b"accept-encoding", b"gzip")))
    hit, _ = await rig.fetch(get(b"/a", (b"accept-encoding", b"gzip")))
    other, _ = await rig.fetch(get(b"/a", (b"accept-encoding", b"br")))
    assert status_of(hit).startswith("resilient-ambassador; hit")
    assert "fwd=vary-miss" in status_of(other)


async def test_credential_partitions_never_share_entries(
    autojump_clock: trio.testing.MockClock, rig: Rig
) -> None:
    stats = CacheStats()
    rig.upstream.default = reply(cache_control="max-age=60")
    a = CacheStage(rig.upstream, ON, rig.store, route="r", partition=lambda: "key-a", stats=stats, clock=wall)
    b = CacheStage(rig.upstream, ON, rig.store, route="r", partition=lambda: "key-b", stats=stats, clock=wall)
    await read(await a(get()))
    await read(await b(get()))
    await read(await a(get()))
    assert len(rig.upstream.seen) == 2
    assert stats.hits == 1


@settings(max_examples=60, deadline=None)
@given(
    directives=st.lists(
        st.sampled_from(
            ["max-age=60", "s-maxage=60", "public", "stale-if-error=60", "immutable", "no-cache"]
        ),
        max_size=3,
    ),
    forbidden=st.sampled_from(["no-store", "private", 'private="x-a"', "No-Store"]),
    split=st.booleans(),
)
def test_no_store_and_private_responses_never_reach_the_store(
    directives: list[str], forbidden: str, split: bool
) -> None:
    values = [*directives, forbidden]
    lines = (
        [(b"cache-control", v.encode()) for v in values]
        if split
        else [(b"cache-control", ", ".join(values).encode())]
    )

    async def scenario() -> None:
        store = MemoryCacheStore(1 << 20)
        upstream = Upstream(default=lambda _: Response(200, list(lines), BufferedBody(b"secret")))
        stage = CacheStage(
            upstream, dataclasses.replace(ON, default_ttl_s=60.0, stale_if_error_s=60.0), store, route="r"
        )
        for _ in range(2):
            await read(await stage(get()))
        assert store.stats.entries == 0
        assert store.stats.stores == 0
        assert len(upstream.seen) == 2

    trio.run(scenario)
