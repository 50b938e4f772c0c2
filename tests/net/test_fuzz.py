"""Hypothesis fuzzing through the real daemon: hostile request bytes (split at arbitrary points)
on the client side, hostile response bytes on the upstream side, delivered through the fault
proxy (tests/support/fault_proxy.py) which may also reset, close or drip them.

Properties, for every example: no unhandled exception in the daemon (nothing logged at ERROR,
no exception escapes a connection), the daemon still answers a normal request afterwards, the
upstream only ever receives strictly framed requests (h11 parses them, never both
Content-Length and Transfer-Encoding, CRLF line endings, no obs-fold), the client only ever
gets well-framed responses (or one cut short), and the injected credential never shows up.

One daemon serves every example, for speed: the async test starts it, then runs hypothesis
in a worker thread whose examples hop back into the test's event loop with
`trio.from_thread.run`. Profiles, as in mitmproxy's test_http_fuzz.py: `fast` (the default,
derandomized so CI is deterministic) and `deep` for a long run by hand:

    AMBASSADOR_FUZZ_PROFILE=deep .venv/bin/pytest tests/net/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import h11
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_ambassador.core.config import (
    AccessLogConfig,
    ClientLimits,
    RetryConfig,
    RouteConfig,
    UpstreamTimeouts,
)
from resilient_ambassador.core.templates import Template, TemplatePart
from resilient_ambassador.secrets import SecretResolver
from tests.support.client import RawConnection, http_request, parse_responses
from tests.support.daemon import RunningDaemon, simple_config, start_daemon, upstream_config
from tests.support.fault_proxy import FaultProxy, start_fault_proxy
from tests.support.upstream import FakeUpstream, Reply, start_fake_upstream

settings.register_profile(
    "fast",
    max_examples=60,
    derandomize=True,  # the same examples on every CI run
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    max_examples=3000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("AMBASSADOR_FUZZ_PROFILE", "fast"))

CANARY = "fuzz-canary-5b1e0c"
# A client stream that ends mid-body shows up upstream as a truncated request: the daemon
# aborted it, which is what it must do. Any other h11 complaint is a framing bug.
TRUNCATED = "h11: peer closed connection without sending complete message body"

# -- grammar: pieces of requests --------------------------------------------------------------

METHODS = [b"GET", b"GET", b"POST", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH"]
HOSTILE_METHODS = [b"get", b"CONNECT", b"PRI", b"G\x00T", b"", b"GET GET", b"\x16\x03\x01"]
TARGETS = [b"/", b"/a/b?c=d", b"/v1/x?api_key=mine", b"*", b"//a/../b", b"/%2e%2e/x", b"/%0d%0a"]
HOSTILE_TARGETS = [
    b"http://169.254.169.254/latest/meta-data",
    b"http://a/x",
    b"/\xff\xfe",
    b"/a b",
    b"/a\x00b",
    b"",
    b"/" + b"a" * 9000,
]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1", b"", b"http/1.1"]
EOLS = [b"\r\n", b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n"]
HEADER_LINES = [
    b"Host: a",
    b"Host: 127.0.0.1:6379",
    b"Host: 169.254.169.254",
    b"Host:",
    b"Host: a\x00b",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Connection: close, X-Api-Key",
    b"Connection: X-Api-Key, Host, X-Forwarded-For",
    b"X-Api-Key: client-copy",
    b"Expect: 100-continue",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding: xchunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding : chunked",
    b"Transfer-Encoding:\tchunked",
    b" Transfer-Encoding: chunked",
    b"Content-Length: 0",
    b"Content-Length: 5",
    b"Content-Length: 5",
    b"Content-Length: 5, 5",
    b"Content-Length: -1",
    b"Content-Length: +5",
    b"Content-Length: 0x5",
    b"Content-Length: " + b"9" * 25,
    b" folded: continuation",
    b"\tX-Tab: v",
    b"X-Nul: a\x00b",
    b"Bad Name: v",
    b"X_Under: v",
    b": no-name",
    b"no-colon",
    b"X-Forwarded-For: 1.2.3.4",
    b"X-Forwarded-Host: evil",
    b"Upgrade: h2c",
    b"traceparent: 00-zz-zz-zz",
    b"Via: 1.1 other",
    b"X-Big: " + b"v" * 9000,
]
CHUNK_SIZES = [b"FFFFFFFFFFFFFFED", b"0x1", b" 1", b"-1", b"zz", b"1;" + b"e" * 2000, b""]

header_names = st.binary(min_size=1, max_size=12).filter(lambda b: b"\n" not in b and b"\r" not in b)


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    """Chunks with real sizes, or hostile ones; maybe a last chunk, trailers and the end."""
    out = bytearray()
    for data in draw(st.lists(st.binary(max_size=20), max_size=4)):
        size = draw(st.one_of(st.just(b"%x" % len(data)), st.sampled_from(CHUNK_SIZES)))
        if draw(st.booleans()):
            size += b";ext=" + draw(st.sampled_from([b"1", b"x" * 300]))
        out += size + draw(st.sampled_from(EOLS)) + data + draw(st.sampled_from(EOLS))
    if draw(st.booleans()):
        out += b"0\r\n"
        for _ in range(draw(st.integers(0, 2))):
            out += draw(st.sampled_from([b"X-Trailer: v", b"Content-Length: 9", b"bad trailer"])) + b"\r\n"
        out += b"\r\n"
    return bytes(out)


SAFE_HEADER_LINES = [
    b"Connection: close",
    b"Connection: keep-alive",
    b"Connection: close, X-Api-Key",
    b"Connection: X-Api-Key, Host, X-Forwarded-For",
    b"X-Api-Key: client-copy",
    b"Expect: 100-continue",
    b"X-Forwarded-For: 1.2.3.4",
    b"X-Forwarded-Host: evil",
    b"traceparent: 00-zz-zz-zz",
    b"Via: 1.1 other",
    b"X_Under: v",
    b"Accept: */*",
]


@st.composite
def valid_request(draw: st.DrawFn) -> list[bytes]:
    """A well-formed request as lines (head lines, then the body as the last item)."""
    method = draw(st.sampled_from(METHODS))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    lines = [method + b" " + target + b" " + version, b"Host: a"]
    lines += draw(st.lists(st.sampled_from(SAFE_HEADER_LINES), max_size=3))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b""
    if framing == "length":
        body = draw(st.binary(max_size=16))
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked" and version == b"HTTP/1.1":
        chunks = draw(st.lists(st.binary(min_size=1, max_size=8), max_size=3))
        lines.append(b"Transfer-Encoding: chunked")
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    return [line + b"\r\n" for line in lines] + [b"\r\n" + body]


@st.composite
def hostile_request(draw: st.DrawFn) -> list[bytes]:
    """Anything the grammar can put together."""
    method = draw(st.one_of(st.sampled_from(METHODS), st.sampled_from(HOSTILE_METHODS)))
    target = draw(st.one_of(st.sampled_from(TARGETS), st.sampled_from(HOSTILE_TARGETS)))
    version = draw(st.sampled_from(VERSIONS))
    lines = [b" ".join(part for part in (method, target, version))]
    if draw(st.booleans()) or draw(st.booleans()):
        lines.append(b"Host: a")
    lines += draw(st.lists(st.sampled_from(HEADER_LINES), max_size=5))
    lines += [
        name + b": " + value
        for name, value in draw(st.lists(st.tuples(header_names, st.binary(max_size=16)), max_size=2))
    ]
    body = draw(st.one_of(st.just(b""), st.binary(max_size=16), chunked_body()))
    return [line + draw(st.sampled_from(EOLS)) for line in lines] + [draw(st.sampled_from(EOLS)) + body]


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    """A valid request, a valid one with one hostile change, or a hostile one; maybe followed
    by a pipelined second request."""
    mode = draw(st.sampled_from(["valid", "mutated", "hostile"]))
    parts = draw(hostile_request() if mode == "hostile" else valid_request())
    if mode == "mutated":
        where = draw(st.integers(1, len(parts) - 1))
        mutation = draw(st.sampled_from(["header", "eol", "body"]))
        if mutation == "header":
            parts.insert(where, draw(st.sampled_from(HEADER_LINES)) + b"\r\n")
        elif mutation == "eol" and where < len(parts) - 1:
            parts[where] = parts[where][:-2] + draw(st.sampled_from(EOLS))
        else:
            parts[-1] = b"\r\n" + draw(chunked_body())
    pipelined = draw(st.sampled_from([b"", b"", b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n"]))
    return b"".join(parts) + pipelined


def split(data: bytes, points: list[int]) -> list[bytes]:
    """`data` cut at `points` (offsets, any order, clipped to the data)."""
    cuts = sorted({min(p, len(data)) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]


# -- grammar: pieces of responses --------------------------------------------------------------

STATUS_LINES = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 404 Not Found",
    b"HTTP/1.0 200 OK",
    b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 Not Modified",
    b"HTTP/1.1 503 Service Unavailable",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK",
    b"HTTP/1.1 101 Switching Protocols",
    b"HTTP/1.1 2OO OK",
    b"HTTP/1.1 999 Weird",
    b"HTTP/1.1 200",
    b"HTTP/2 200",
    b"\x16\x03\x01\x00garbage",
    b"",
]
RESPONSE_HEADER_LINES = [
    b"Content-Length: {len}",
    b"Content-Length: {len}",
    b"Content-Length: {len}",
    b"Content-Length: 5",
    b"Content-Length: 100000",
    b"Content-Length: -1",
    b"Content-Length: abc",
    b"Content-Length: {len}, {len}",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip",
    b"Connection: close",
    b"Connection: keep-alive",
    b"X-Bad: a\rb",
    b"X-Fold: a\r\n b",
    b"X-Nul: a\x00b",
    b"Set-Cookie: s=1",
    b"Retry-After: 120",
    b"Location: http://evil.example/",
    b"X-Echo: " + CANARY.encode(),
    b"X-Big: " + b"v" * 40_000,
    b"\n".join(b"X-%d: v" % i for i in range(150)),
]


@dataclass
class UpstreamAnswer:
    raw: bytes
    close_after: bool


@st.composite
def response_bytes(draw: st.DrawFn) -> UpstreamAnswer:
    body = draw(st.one_of(st.binary(max_size=32), chunked_body()))
    lines = [draw(st.sampled_from(STATUS_LINES))]
    lines += draw(st.lists(st.sampled_from(RESPONSE_HEADER_LINES), max_size=4))
    eol = draw(st.sampled_from(EOLS))
    head = b"".join(line.replace(b"{len}", b"%d" % len(body)) + eol for line in lines) + eol
    extra = draw(st.sampled_from([b"", b"", b"", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]))
    return UpstreamAnswer(raw=head + body + extra, close_after=draw(st.booleans()))


# -- the harness --------------------------------------------------------------------------------


@dataclass
class Harness:
    daemon: RunningDaemon
    upstream: FakeUpstream
    proxy: FaultProxy  # between the daemon and the upstream: faults on the wire
    access_log: Path
    errors: list[logging.LogRecord] = field(default_factory=list)
    examples: int = 0

    async def finish(self) -> None:
        """After the last example: at least one ran, and the access log holds no secret."""
        assert self.examples >= 1
        assert self.daemon.app.access_log is not None
        await self.daemon.app.access_log.flush()
        text = await trio.Path(self.access_log).read_text()
        assert text.count("\n") >= self.examples  # a line per health check at least
        assert CANARY not in text
        print(f"fuzz: {self.examples} examples through one daemon")  # seen with -s (deep runs)

    async def healthy(self) -> None:
        """The daemon still answers a normal request, and has logged nothing at ERROR."""
        self.proxy.clear()
        self.upstream.default = Reply(body=b"healthy")
        with trio.fail_after(5):
            response = await http_request(self.daemon.port, "GET", "/health-check")
        assert (response.status, response.body) == (200, b"healthy")
        assert not self.errors, [r.getMessage() for r in self.errors]
        self.check_upstream()

    async def settled(self) -> None:
        """Wait until every upstream connection is idle or closed: the daemon is done with it."""
        with trio.fail_after(5):
            await self.upstream.wait_until(lambda: all(c.closed or c.idle for c in self.upstream.connections))

    def check_upstream(self) -> None:
        for record in self.upstream.connections:
            assert record.error is None or record.error.startswith(TRUNCATED), record.error
        for received in self.upstream.received:
            names = {name for name, _ in received.headers}
            assert not {b"content-length", b"transfer-encoding"} <= names, received.raw[:300]
            assert received.header_values("x-api-key") == [CANARY], received.headers
            assert_strict_head(received.raw)


def assert_strict_head(raw: bytes) -> None:
    """RFC 9112 as a strict parser reads it: CRLF only, no obs-fold, no NUL or bare CR."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        assert not any(c in line for c in (b"\n", b"\r", b"\x00")), head[:300]
        assert not line.startswith((b" ", b"\t")), head[:300]


class _ErrorCatcher(logging.Handler):
    """Keeps records at ERROR and above; fails on any record that mentions the canary."""

    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or CANARY in record.getMessage():
            self.sink.append(record)


@contextmanager
def _catch_errors(sink: list[logging.LogRecord]) -> Iterator[None]:
    handler = _ErrorCatcher(sink)
    logger = logging.getLogger("resilient_ambassador")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def _harness(nursery: trio.Nursery, log_dir: Path, *, route: RouteConfig | None = None) -> Harness:
    upstream = await start_fake_upstream(nursery)
    proxy = await start_fault_proxy(nursery, "127.0.0.1", upstream.port)
    secret = Template(parts=(TemplatePart("env", "API_KEY"),), source="${API_KEY}")
    config = simple_config(
        upstream_config(
            proxy.url(),
            headers=(("X-Api-Key", secret),),
            timeouts=UpstreamTimeouts(connect_s=1.0, response_s=0.3, read_idle_s=0.3),
        ),
        routes=[route] if route is not None else None,
        # Short enough that an example never waits long; the client half-closes anyway.
        limits=ClientLimits(header_read_timeout_s=1.0, body_read_timeout_s=1.0, keepalive_timeout_s=1.0),
    )
    config = dataclasses.replace(config, access_log=AccessLogConfig(path=str(log_dir / "access.log")))
    daemon = await start_daemon(nursery, config, SecretResolver(environ={"API_KEY": CANARY}))
    return Harness(daemon=daemon, upstream=upstream, proxy=proxy, access_log=log_dir / "access.log")


async def _exchange(port: int, pieces: list[bytes], *, abort: bool = False) -> bytes:
    """Send each piece as its own write, letting the daemon read it before the next one; then
    half-close (or vanish, with `abort`) and read what comes back."""
    async with await RawConnection.connect(port) as conn:
        for piece in pieces:
            try:
                await conn.send(piece)
            except trio.BrokenResourceError:
                break  # the daemon already answered and closed
            await trio.testing.wait_all_tasks_blocked()
        if abort:
            return b""
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await conn.half_close()
        read = await conn.receive_until_closed(timeout_s=5.0)
    assert read.ending != "timeout", read.data[:300]
    return read.data


def _check_client_view(data: bytes, methods: list[str]) -> None:
    """What the client got parses as responses, one maybe cut short (an aborted body).
    `methods`: of the requests sent, in order (a response to HEAD has no body)."""
    assert CANARY.encode() not in data
    if not data:
        return  # closed without a word: a peer that vanished, or an incomplete head at EOF
    responses, rest = parse_responses(data, request_methods=methods)
    assert rest == b"" or rest.startswith(b"HTTP/1.1 "), (data[:300], rest[:300])
    for response in responses:
        names = {name for name, _ in response.headers}
        assert not {b"content-length", b"transfer-encoding"} <= names


def _run_in_thread(harness: Harness, test: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with _catch_errors(harness.errors):
            test()

    return run


async def test_fuzz_requests_from_the_client(nursery: trio.Nursery, tmp_path: Path) -> None:
    harness = await _harness(nursery, tmp_path)

    @settings(PROFILE)
    @given(
        data=request_bytes(),
        points=st.lists(st.integers(0, 400), max_size=6),
        abort=st.integers(0, 9).map(lambda n: n == 0),
    )
    def fuzz(data: bytes, points: list[int], abort: bool) -> None:
        async def example() -> None:
            harness.upstream.default = Reply(body=b"ok")
            got = await _exchange(harness.daemon.port, split(data, points), abort=abort)
            _check_client_view(got, ["HEAD" if data.startswith(b"HEAD ") else "GET", "GET"])
            await harness.settled()
            await harness.healthy()
            harness.examples += 1

        trio.from_thread.run(example)

    await trio.to_thread.run_sync(_run_in_thread(harness, fuzz))
    await harness.finish()


async def test_fuzz_responses_from_the_upstream(nursery: trio.Nursery, tmp_path: Path) -> None:
    retry = RetryConfig(retries=1, backoff_base_s=0.001, backoff_max_s=0.001, budget_min_per_s=100.0)
    harness = await _harness(nursery, tmp_path, route=RouteConfig(upstream="up", retry=retry))

    @settings(PROFILE)
    @given(
        answer=response_bytes(),
        method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
        points=st.lists(st.integers(0, 400), max_size=3),
        wire=st.one_of(
            st.none(), st.tuples(st.sampled_from(["reset", "limit", "slice"]), st.integers(0, 400))
        ),
    )
    def fuzz(answer: UpstreamAnswer, method: bytes, points: list[int], wire: tuple[str, int] | None) -> None:
        async def example() -> None:
            harness.upstream.default = Reply(raw=answer.raw, close_after=answer.close_after)
            _wire_fault(harness.proxy, wire)
            body = b"Content-Length: 3\r\n\r\nabc" if method == b"POST" else b"\r\n"
            request = method + b" /fuzz HTTP/1.1\r\nHost: a\r\n" + body
            got = await _exchange(harness.daemon.port, split(request, points))
            _check_client_view(got, [method.decode()])
            await harness.settled()
            await harness.healthy()
            harness.examples += 1

        trio.from_thread.run(example)

    await trio.to_thread.run_sync(_run_in_thread(harness, fuzz))
    await harness.finish()


def _wire_fault(proxy: FaultProxy, wire: tuple[str, int] | None) -> None:
    """The response bytes cut (RST or FIN) after `at` bytes on the connection, or dripped in
    slices of a few bytes."""
    if wire is None:
        return
    kind, at = wire
    if kind == "reset":
        proxy.downstream.reset_after_bytes = at
    elif kind == "limit":
        proxy.downstream.limit_bytes = at
    else:
        proxy.downstream.slice_bytes = at % 16 + 1


def test_split_cuts_at_every_point() -> None:
    assert split(b"abcdef", [4, 1, 99, 1]) == [b"a", b"bcd", b"ef"]
    assert split(b"", [3]) == []


def test_grammar_makes_both_valid_and_hostile_requests() -> None:
    """The grammar is not all noise: h11 accepts some of what it makes, and rejects some."""
    accepted = rejected = 0

    @settings(max_examples=100, derandomize=True, database=None)
    @given(data=request_bytes())
    def count(data: bytes) -> None:
        nonlocal accepted, rejected
        h = h11.Connection(h11.SERVER)
        h.receive_data(data)
        try:
            event = h.next_event()
        except h11.RemoteProtocolError:
            rejected += 1
            return
        accepted += isinstance(event, h11.Request)

    count()
    assert accepted >= 10
    assert rejected >= 10
