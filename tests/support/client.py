"""Downstream clients for tests: a well-behaved h11 client and a raw-bytes one.

`http_request` / `HttpClient` speak correct HTTP/1.1 (h11 client side) and return parsed
responses; `HttpClient` keeps one connection so tests can see reuse and `Connection: close`.
`raw_exchange` / `RawConnection` send arbitrary bytes (request smuggling, slowloris, garbage)
and hand back whatever came back; `parse_responses` and `parse_status` pick that apart.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self, final

import h11
import trio

_READ_SIZE_BYTES = 64 * 1024
# Generous: a test that needs longer is waiting for a bug, and faulthandler_timeout is 60 s.
DEFAULT_TIMEOUT_S = 10.0
# How long a request with `Expect: 100-continue` holds its body back for a 100; curl's default.
EXPECT_CONTINUE_WAIT_S = 1.0

HeaderPairs = Sequence[tuple[str | bytes, str | bytes]]


@final
@dataclass(frozen=True, slots=True)
class ClientResponse:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lowercased by h11
    body: bytes  # de-chunked
    reason: bytes = b""
    http_version: bytes = b"1.1"
    informational: list[int] = field(default_factory=list)  # 1xx statuses that came first

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in order."""
        key = name.lower().encode("ascii")
        return [value.decode("latin-1") for k, value in self.headers if k == key]

    def header(self, name: str) -> str | None:
        """Header `name`, repeated values joined with ", " (RFC 9110 5.3); None if absent."""
        values = self.header_values(name)
        return ", ".join(values) if values else None


# Called with every response the h11 client parses (tests/conftest.py's secret canary).
RESPONSE_OBSERVERS: list[Callable[[ClientResponse], None]] = []


def _response(head: h11.Response, body: bytearray, informational: list[int]) -> ClientResponse:
    response = ClientResponse(
        status=head.status_code,
        headers=list(head.headers),
        body=bytes(body),
        reason=head.reason,
        http_version=head.http_version,
        informational=informational,
    )
    for observe in RESPONSE_OBSERVERS:
        observe(response)
    return response


def _latin1(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


def _request_headers(
    method: str, headers: HeaderPairs, body: bytes | Sequence[bytes], authority: str
) -> list[tuple[bytes, bytes]]:
    """`headers` plus what h11 needs: a Host, and framing for any body."""
    out = [(_latin1(name), _latin1(value)) for name, value in headers]
    names = {name.lower() for name, _ in out}
    if b"host" not in names:
        out.insert(0, (b"host", authority.encode("ascii")))
    if b"content-length" not in names and b"transfer-encoding" not in names:
        if not isinstance(body, bytes):
            out.append((b"transfer-encoding", b"chunked"))
        elif body or method.upper() in ("POST", "PUT", "PATCH"):
            out.append((b"content-length", str(len(body)).encode()))
    return out


@contextlib.contextmanager
def _unwrap_lone_error() -> Iterator[None]:
    """Let a single error out of a nursery bare, as callers of a plain call expect it."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            error = group.exceptions[0]
            raise error from error.__cause__
        raise


@final
class HttpClient:
    """One HTTP/1.1 connection, used for as many requests as the server allows."""

    def __init__(self, stream: trio.abc.Stream, authority: str, timeout_s: float) -> None:
        self._stream = stream
        self._authority = authority
        self._timeout_s = timeout_s
        self._h = h11.Connection(h11.CLIENT)
        self.requests_sent = 0

    @classmethod
    async def connect(
        cls,
        port: int,
        host: str = "127.0.0.1",
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> HttpClient:
        """Connect (and handshake, with `ssl_context`); each request then gets `timeout_s`."""
        with trio.fail_after(timeout_s):
            tcp = await trio.open_tcp_stream(host, port)
            stream: trio.abc.Stream = tcp
            if ssl_context is not None:
                tls = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname or host)
                stream = tls
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tls)
                    raise
        return cls(stream, f"{host}:{port}", timeout_s)

    @property
    def reusable(self) -> bool:
        """Whether another request may be sent: neither side asked to close."""
        return self._h.our_state is h11.IDLE and self._h.their_state is h11.IDLE

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: HeaderPairs = (),
        body: bytes | Sequence[bytes] = b"",
    ) -> ClientResponse:
        """Send one request and read its whole response.

        A Host header (`host:port`) and Content-Length (or chunked, for a sequence body) are
        added unless given. The body is sent while the response is read, so an early response
        (413, say) is returned even if the server stops reading; with `Expect: 100-continue` the
        body waits for the 100 (or `EXPECT_CONTINUE_WAIT_S`, as curl does). Raises
        `trio.TooSlowError` after `timeout_s`.
        """
        if not self.reusable:
            raise RuntimeError(f"connection not reusable: {self._h.states}")
        chunks = [body] if isinstance(body, bytes) else list(body)
        head = h11.Request(
            method=method, target=target, headers=_request_headers(method, headers, body, self._authority)
        )
        go_ahead = trio.Event()  # a 100 Continue or a final response arrived

        async def send_body() -> None:
            if self._h.client_is_waiting_for_100_continue:
                with trio.move_on_after(EXPECT_CONTINUE_WAIT_S):
                    await go_ahead.wait()
            # A server that answered early may close before reading it all: not our failure.
            with contextlib.suppress(trio.BrokenResourceError):
                for chunk in chunks:
                    await self._send(h11.Data(data=chunk))
                await self._send(h11.EndOfMessage())

        with trio.fail_after(self._timeout_s):
            await self._send(head)
            self.requests_sent += 1
            with _unwrap_lone_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_body)
                    response = await self._read_response(go_ahead)
                    nursery.cancel_scope.cancel()  # a response before the whole body: stop sending
        if self._h.our_state is h11.DONE and self._h.their_state is h11.DONE:
            self._h.start_next_cycle()
        return response

    async def read_until_eof(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
        """Wait for the server to close; return any bytes it sent first (should be b"").

        Raises `trio.TooSlowError` if it keeps the connection open for `timeout_s`.
        """
        extra = bytearray(self._h.trailing_data[0])
        with trio.fail_after(timeout_s):
            while True:
                try:
                    data = await self._stream.receive_some(_READ_SIZE_BYTES)
                except trio.BrokenResourceError:
                    break  # reset: closed, if impolitely
                if not data:
                    break
                extra += data
        return bytes(extra)

    async def close(self) -> None:
        await trio.aclose_forcefully(self._stream)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _send(self, event: h11.Event) -> None:
        data = self._h.send(event)
        try:
            if data:
                await self._stream.send_all(data)
        except BaseException:
            self._h.send_failed()
            raise

    async def _read_response(self, go_ahead: trio.Event) -> ClientResponse:
        informational: list[int] = []
        head: h11.Response | None = None
        body = bytearray()
        while True:
            event = self._h.next_event()
            if event is h11.NEED_DATA:
                self._h.receive_data(bytes(await self._stream.receive_some(_READ_SIZE_BYTES)))
            elif isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
                go_ahead.set()
            elif isinstance(event, h11.Response):
                head = event
                go_ahead.set()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _response(head, body, informational)
            else:
                raise h11.RemoteProtocolError(f"connection ended mid-response: {event!r}")


async def http_request(
    port: int,
    method: str = "GET",
    target: str = "/",
    headers: HeaderPairs = (),
    body: bytes | Sequence[bytes] = b"",
    host: str = "127.0.0.1",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ClientResponse:
    """One request on a fresh connection, closed afterwards."""
    async with await HttpClient.connect(port, host, timeout_s=timeout_s) as client:
        return await client.request(method, target, headers, body)


# -- raw bytes -------------------------------------------------------------------------------

Ending = Literal["eof", "reset", "timeout"]


@final
@dataclass(frozen=True, slots=True)
class RawRead:
    data: bytes
    ending: Ending  # how reading stopped: the server closed (FIN), reset (RST), or went quiet


@final
class RawConnection:
    """A TCP connection for hand-written bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawConnection:
        with trio.fail_after(DEFAULT_TIMEOUT_S):
            return cls(await trio.open_tcp_stream(host, port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def half_close(self) -> None:
        """Send FIN: we will write no more, but still read."""
        await self.stream.send_eof()

    async def receive_some(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
        """Bytes as soon as some arrive (b"" at EOF); `trio.TooSlowError` after `timeout_s`."""
        with trio.fail_after(timeout_s):
            return await self.stream.receive_some(_READ_SIZE_BYTES)

    async def receive_until_closed(self, timeout_s: float = 5.0) -> RawRead:
        """Everything the server sends until it closes, resets, or `timeout_s` passes."""
        data = bytearray()
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    chunk = await self.stream.receive_some(_READ_SIZE_BYTES)
                except trio.BrokenResourceError:
                    return RawRead(bytes(data), "reset")
                if not chunk:
                    return RawRead(bytes(data), "eof")
                data += chunk
        return RawRead(bytes(data), "timeout")

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def raw_exchange(
    port: int,
    data: bytes | Sequence[bytes],
    *,
    host: str = "127.0.0.1",
    read_timeout_s: float = 5.0,
    half_close: bool = False,
) -> bytes:
    """Send `data` (a sequence: one write each), then return all received until close/timeout.

    `half_close` sends FIN after the data. A reset by the server ends the read like a close;
    use `RawConnection.receive_until_closed` to tell them apart.
    """
    async with await RawConnection.connect(port, host) as conn:
        for part in [data] if isinstance(data, bytes) else data:
            try:
                await conn.send(part)
            except trio.BrokenResourceError:
                break  # the server already hung up; still collect what it said
        else:
            if half_close:
                await conn.half_close()
        return (await conn.receive_until_closed(read_timeout_s)).data


_STATUS_LINE = re.compile(rb"HTTP/\d\.\d (\d{3})[ \r]")


def parse_status(raw: bytes) -> int:
    """The status code of the first response in `raw`; ValueError if it has no status line."""
    match = _STATUS_LINE.match(raw)
    if match is None:
        raise ValueError(f"no status line at the start of {raw[:80]!r}")
    return int(match.group(1))


def parse_responses(raw: bytes, *, request_methods: Sequence[str] = ()) -> tuple[list[ClientResponse], bytes]:
    """Split a raw capture (read until the server closed) into responses, as h11 frames them.

    `request_methods[i]` is the method of the i-th request ("GET" when not given): a response
    to HEAD has no body. Returns the responses parsed and the bytes that did not parse as one
    (b"" when the capture was exactly a sequence of well-framed responses).
    """
    h = h11.Connection(h11.CLIENT)
    h.receive_data(raw)
    h.receive_data(b"")  # the capture ends where the server closed
    responses: list[ClientResponse] = []
    start = 0  # offset in `raw` where the response being parsed began
    while True:
        method = request_methods[len(responses)] if len(responses) < len(request_methods) else "GET"
        h.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        h.send(h11.EndOfMessage())
        informational: list[int] = []
        head: h11.Response | None = None
        body = bytearray()
        try:
            while True:
                event = h.next_event()
                if isinstance(event, h11.InformationalResponse):
                    informational.append(event.status_code)
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    responses.append(_response(head, body, informational))
                    break
                else:  # ConnectionClosed or NEED_DATA: no (complete) response here
                    return responses, raw[start:]
        except h11.RemoteProtocolError:
            return responses, raw[start:]
        unread = len(h.trailing_data[0])
        start = len(raw) - unread
        if h.our_state is not h11.DONE or h.their_state is not h11.DONE or not unread:
            return responses, raw[start:]
        h.start_next_cycle()
