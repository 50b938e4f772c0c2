"""A scriptable fake upstream: a real HTTP/1.1 server (trio + h11) on a loopback socket.

Tests queue `Reply`s with `FakeUpstream.script` and assert on what arrived in
`FakeUpstream.received` (one `Received` per request, with the exact bytes seen on the wire) and
`FakeUpstream.connections` (one `ConnectionRecord` per accepted TCP connection, with every byte
it carried, so a smuggling test can assert that nothing reached the upstream at all).

    upstream = await start_fake_upstream(nursery)
    upstream.script(Reply(status=503), Reply(body=b"second try"))
    ...
    assert [r.connection_id for r in upstream.received] == [0, 0]

The n-th scripted reply answers the n-th *complete* request (in order of completion, across all
connections); once the script runs out, `default` answers (a `Reply` or a handler such as
`echo`). Nothing here sleeps unless a `Reply` asks for a delay.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Literal, NoReturn, TypedDict, cast, final

import h11
import trio

# Big enough that a test body arrives in a few reads, small enough to interleave with sends.
_READ_SIZE_BYTES = 64 * 1024
# A graceful TLS close sends close_notify; a peer that never reads must not hold the test up.
_CLOSE_TIMEOUT_S = 1.0

DropMode = Literal["fin", "rst"]


@final
@dataclass(frozen=True, slots=True)
class Reply:
    """What the fake upstream does with one request (after reading all of it)."""

    status: int = 200
    headers: Sequence[tuple[str, str]] = (("content-type", "text/plain"),)
    # bytes: sent with a Content-Length added unless `headers` frame it. A sequence: one Data
    # event per item, chunked unless `headers` has a Content-Length.
    body: bytes | Sequence[bytes] = b"ok"
    delay_s: float = 0.0  # before anything is sent (or the connection dropped)
    # Between body chunks. Without it the whole response is one write; with it the head goes
    # with the first chunk, so body=[b"", ...] sends the head alone first.
    chunk_delay_s: float = 0.0
    # Sent verbatim instead of an h11 response (garbage, double framing, CR/LF in headers...).
    # The connection then carries on with the next request unless `close_after`.
    raw: bytes | None = None
    # Send the head and the first chunk (half of a bytes body), then reset (SO_LINGER 0).
    reset_after_head: bool = False
    close_after: bool = False  # close after the response (adding `Connection: close` unless raw)
    drop: DropMode | None = None  # close without answering: FIN or RST


@final
@dataclass(frozen=True, slots=True)
class Received:
    """One request as the fake upstream saw it."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]  # names lowercased by h11, values as sent
    body: bytes  # de-chunked
    raw: bytes  # the exact bytes of head and body as they arrived (still chunked)
    connection_id: int  # index into FakeUpstream.connections: equal ids = a reused connection
    complete: bool = True  # False: the peer went away (or broke framing) mid-body; no reply

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in order."""
        key = name.lower().encode("ascii")
        return [value.decode("latin-1") for k, value in self.headers if k == key]

    def header(self, name: str) -> str | None:
        """Header `name`, repeated values joined with ", " (RFC 9110 5.3); None if absent."""
        values = self.header_values(name)
        return ", ".join(values) if values else None


@final
@dataclass(slots=True)
class ConnectionRecord:
    """One accepted TCP connection. Mutated by the server while the connection lives."""

    id: int
    raw: bytearray = field(default_factory=bytearray)  # every byte received (after TLS)
    requests: int = 0  # complete requests read
    error: str | None = None  # h11 rejected the bytes, or the TLS handshake failed
    # Waiting for a (next) request, none of it received yet. Set just before the last byte of
    # a keep-alive response is written, so it holds by the time a client has read the response.
    idle: bool = False
    closed: bool = False  # set as the server starts closing it (after EOF, error or reply)


Handler = Callable[[Received], Reply]


class Echo(TypedDict):
    method: str
    target: str
    http_version: str
    headers: list[list[str]]
    body: str
    connection_id: int


def echo(received: Received) -> Reply:
    """A handler answering 200 with the request as JSON (strings decoded as latin-1, losslessly)."""
    doc: Echo = {
        "method": received.method.decode("latin-1"),
        "target": received.target.decode("latin-1"),
        "http_version": received.http_version.decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in received.headers],
        "body": received.body.decode("latin-1"),
        "connection_id": received.connection_id,
    }
    return Reply(headers=(("content-type", "application/json"),), body=json.dumps(doc).encode())


def parse_echo(body: bytes) -> Echo:
    """The document `echo` sent, as a client received it."""
    return cast(Echo, json.loads(body))


@final
class _CloseConnection(Exception):
    """Raised inside a connection handler to end it; `reset` picks RST over FIN."""

    def __init__(self, *, reset: bool = False) -> None:
        super().__init__()
        self.reset = reset


@final
class _Connection:
    """Server-side state of one live connection."""

    def __init__(self, record: ConnectionRecord, tcp: trio.SocketStream) -> None:
        self.record = record
        self.tcp = tcp
        self.stream: trio.abc.Stream = tcp
        self.idle_scope: trio.CancelScope | None = None  # set while blocked waiting idle
        self.close_requested = False  # by close_idle_connections
        self.close_with_reset = False
        self.closed = trio.Event()


@final
class FakeUpstream:
    """The server. Build it with `start_fake_upstream`; read its attributes from tests."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        default: Reply | Handler | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.host = host
        self.port = port  # 0: an ephemeral port, set once listening
        self.default: Reply | Handler = Reply() if default is None else default
        self.received: list[Received] = []
        self.connections: list[ConnectionRecord] = []
        self._tls = tls
        self._script: deque[Reply | Handler] = deque()
        self._live: dict[int, _Connection] = {}
        self._changed = trio.Event()
        self._cancel_scope = trio.CancelScope()
        self._stopped = trio.Event()

    # -- what tests call --------------------------------------------------------------------

    @property
    def connections_accepted(self) -> int:
        return len(self.connections)

    def script(self, *replies: Reply | Handler) -> None:
        """Queue replies for the next complete requests; `default` answers after them."""
        self._script.extend(replies)

    @property
    def scripted_left(self) -> int:
        """Scripted replies not used yet."""
        return len(self._script)

    def url(self, host: str | None = None) -> str:
        """Base URL: http://127.0.0.1:PORT, or https://localhost:PORT (the cert's DNS name)."""
        if self._tls is None:
            return f"http://{host or self.host}:{self.port}"
        return f"https://{host or 'localhost'}:{self.port}"

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds; re-checked whenever a connection or request changes
        and whenever bytes arrive."""
        while not predicate():
            changed = self._changed
            await changed.wait()

    async def wait_received(self, count: int) -> None:
        """Return once `count` requests (complete or not) have been recorded."""
        await self.wait_until(lambda: len(self.received) >= count)

    async def close_idle_connections(self, *, reset: bool = False) -> int:
        """Close every keep-alive connection waiting for its next request; return how many.

        Models an upstream's keep-alive timeout firing while the proxy still pools the
        connection. Returns once the sockets are closed (FIN, or RST with `reset`).
        """
        idle = [conn for conn in self._live.values() if conn.record.idle]
        for conn in idle:
            conn.close_requested = True
            conn.close_with_reset = reset
            if conn.idle_scope is not None:
                conn.idle_scope.cancel()
        for conn in idle:
            await conn.closed.wait()
        return len(idle)

    async def stop(self) -> None:
        """Stop listening and close every connection (the port then refuses connections)."""
        self._cancel_scope.cancel()
        await self._stopped.wait()

    # -- server -----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on an ephemeral port, report through `task_status`, serve until cancelled."""
        try:
            with self._cancel_scope:
                listeners = await trio.open_tcp_listeners(self.port, host=self.host)
                listener = listeners[0]
                for extra in listeners[1:]:
                    await extra.aclose()
                async with listener, trio.open_nursery() as nursery:
                    self.port = listener.socket.getsockname()[1]
                    task_status.started()
                    while True:
                        tcp = await listener.accept()
                        # Ids are given in accept order here, not when the handler first runs:
                        # trio does not promise to start tasks in spawn order.
                        record = ConnectionRecord(id=len(self.connections))
                        self.connections.append(record)
                        conn = _Connection(record, tcp)
                        self._live[record.id] = conn
                        self._notify()
                        nursery.start_soon(self._handle_connection, conn)
        finally:
            self._stopped.set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _handle_connection(self, conn: _Connection) -> None:
        try:
            if self._tls is not None:
                tls_stream = trio.SSLStream(conn.tcp, self._tls, server_side=True, https_compatible=True)
                conn.stream = tls_stream
                try:
                    await tls_stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    conn.record.error = f"TLS handshake failed: {exc.__cause__!r}"
                    raise _CloseConnection() from exc
            await self._serve_http(conn)
        except _CloseConnection as close:
            conn.close_with_reset = conn.close_with_reset or close.reset
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer reset or went away mid-send: nothing left to close politely
        finally:
            await self._close(conn)

    async def _close(self, conn: _Connection) -> None:
        # Marked before the close starts so a client that sees EOF also sees `closed`.
        conn.record.idle = False
        conn.record.closed = True
        try:
            if conn.close_with_reset:
                # Abortive close (RFC 9293 3.6): SO_LINGER 0 makes close() send RST, not FIN.
                conn.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await trio.aclose_forcefully(conn.stream)
            else:
                with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
                    scope.shield = True
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await conn.stream.aclose()
                await trio.aclose_forcefully(conn.stream)
        finally:
            del self._live[conn.record.id]
            conn.closed.set()
            self._notify()

    def _set_idle(self, conn: _Connection, idle: bool) -> None:
        if conn.record.idle != idle:
            conn.record.idle = idle
            self._notify()

    async def _receive(self, conn: _Connection, h: h11.Connection, pending: bytearray) -> None:
        """Read once from the socket into `h` (b"" at EOF), recording the bytes."""
        if conn.close_requested:
            raise _CloseConnection(reset=conn.close_with_reset)
        if conn.record.idle:
            with trio.CancelScope() as scope:
                conn.idle_scope = scope
                try:
                    data = await conn.stream.receive_some(_READ_SIZE_BYTES)
                finally:
                    conn.idle_scope = None
            if scope.cancel_called:
                # Closed even if a request raced in: a real server's idle timer has that race too.
                if not scope.cancelled_caught:
                    conn.record.raw += data
                raise _CloseConnection(reset=conn.close_with_reset)
        else:
            data = await conn.stream.receive_some(_READ_SIZE_BYTES)
        if data:
            self._set_idle(conn, False)
        conn.record.raw += data
        pending += data
        h.receive_data(bytes(data))
        if data:
            self._notify()  # so wait_until can watch bytes arrive (a body streaming in, say)

    async def _send(self, conn: _Connection, h: h11.Connection, *events: h11.Event) -> None:
        """Serialise `events` with h11 and write them in one send_all."""
        data = b"".join(h.send(event) or b"" for event in events)
        try:
            if data:
                await conn.stream.send_all(data)
        except BaseException:
            h.send_failed()
            raise

    async def _serve_http(self, conn: _Connection) -> None:
        h = h11.Connection(h11.SERVER)
        pending = bytearray()  # bytes fed to h11 since the current request began
        self._set_idle(conn, True)
        while True:
            try:
                request = await self._read_head(conn, h, pending)
            except h11.RemoteProtocolError as exc:
                await self._reject(conn, h, exc)
            if request is None:
                return
            body = bytearray()
            error: h11.RemoteProtocolError | None = None
            try:
                complete = await self._read_body(conn, h, pending, body)
            except h11.RemoteProtocolError as exc:  # bad chunking, EOF mid-body...
                complete, error = False, exc
            unread = len(h.trailing_data[0])  # already the next request's bytes
            raw = bytes(pending[: len(pending) - unread])
            del pending[: len(pending) - unread]
            received = Received(
                method=request.method,
                target=request.target,
                http_version=request.http_version,
                headers=list(request.headers),
                body=bytes(body),
                raw=raw,
                connection_id=conn.record.id,
                complete=complete,
            )
            self.received.append(received)
            conn.record.requests += complete
            self._notify()
            if error is not None:
                await self._reject(conn, h, error)
            if not complete:
                return

            source = self._script.popleft() if self._script else self.default
            reply = source if isinstance(source, Reply) else source(received)
            await self._send_reply(conn, h, request, reply)
            if reply.raw is not None:
                # h11 never saw the raw response; carry on with a fresh one and the unread bytes.
                h = h11.Connection(h11.SERVER)
                h.receive_data(bytes(pending))
            elif h.our_state is h11.DONE and h.their_state is h11.DONE:
                h.start_next_cycle()
            else:
                return  # Connection: close (either side) or HTTP/1.0

    async def _read_head(
        self, conn: _Connection, h: h11.Connection, pending: bytearray
    ) -> h11.Request | None:
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                await self._receive(conn, h, pending)
            elif isinstance(event, h11.Request):
                self._set_idle(conn, False)  # it may have come whole from the buffer
                return event
            else:
                return None  # ConnectionClosed, or PAUSED after an Upgrade/CONNECT

    async def _read_body(
        self, conn: _Connection, h: h11.Connection, pending: bytearray, body: bytearray
    ) -> bool:
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                if h.they_are_waiting_for_100_continue:
                    # RFC 9110 10.1.1: we want the body, so say so before reading it.
                    await self._send(
                        conn, h, h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                    )
                await self._receive(conn, h, pending)
            elif isinstance(event, h11.Data):
                body += event.data
            else:
                return isinstance(event, h11.EndOfMessage)  # or ConnectionClosed

    async def _reject(self, conn: _Connection, h: h11.Connection, exc: h11.RemoteProtocolError) -> NoReturn:
        """Answer unparseable input as a real server would: an error status, then close."""
        conn.record.error = f"h11: {exc}"
        if h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint
            response = h11.Response(
                status_code=status,
                headers=[("content-length", "0"), ("connection", "close")],
                reason=HTTPStatus(status).phrase.encode(),
            )
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._send(conn, h, response, h11.EndOfMessage())
        raise _CloseConnection() from exc

    async def _send_reply(
        self, conn: _Connection, h: h11.Connection, request: h11.Request, reply: Reply
    ) -> None:
        if reply.delay_s:
            await trio.sleep(reply.delay_s)
        if reply.drop is not None:
            raise _CloseConnection(reset=reply.drop == "rst")
        if reply.raw is not None:
            self._before_last_write(conn, h, request, reply)
            await conn.stream.send_all(reply.raw)
            if reply.close_after:
                raise _CloseConnection()
            return

        chunks = [reply.body] if isinstance(reply.body, bytes) else list(reply.body)
        # RFC 9110 6.4.1: no content in a response to HEAD, nor in a 204 or 304.
        bodiless_status = reply.status in (204, 304)
        headers = list(reply.headers)
        names = {name.lower() for name, _ in headers}
        framed = "content-length" in names or "transfer-encoding" in names
        if isinstance(reply.body, bytes) and not framed and not bodiless_status:
            headers.append(("content-length", str(len(reply.body))))
        if reply.close_after and "connection" not in names:
            headers.append(("connection", "close"))
        try:
            reason = HTTPStatus(reply.status).phrase.encode()
        except ValueError:
            reason = b""
        response = h11.Response(status_code=reply.status, headers=headers, reason=reason)
        if request.method == b"HEAD" or bodiless_status:
            chunks = []
        if reply.reset_after_head:
            first = chunks[0] if chunks else b""
            if isinstance(reply.body, bytes):
                first = first[: len(first) // 2]
            await self._send(conn, h, response, h11.Data(data=first))
            raise _CloseConnection(reset=True)
        # One write per chunk_delay_s gap (the head goes with the first chunk, so an empty first
        # chunk sends the head alone); with no delay the whole response is a single write.
        writes: list[list[h11.Event]] = [[response]]
        for index, chunk in enumerate(chunks):
            if index and reply.chunk_delay_s:
                writes.append([])
            writes[-1].append(h11.Data(data=chunk))
        writes[-1].append(h11.EndOfMessage())
        for index, events in enumerate(writes):
            if index:
                await trio.sleep(reply.chunk_delay_s)
            if index == len(writes) - 1:
                self._before_last_write(conn, h, request, reply)
            await self._send(conn, h, *events)
        if reply.close_after:
            raise _CloseConnection()

    def _before_last_write(
        self, conn: _Connection, h: h11.Connection, request: h11.Request, reply: Reply
    ) -> None:
        # Idle from here, not from after the write: the client may read the response and call
        # close_idle_connections before this task runs again.
        if _keeps_alive(request, reply) and not h.trailing_data[0]:
            self._set_idle(conn, True)


def _keeps_alive(request: h11.Request, reply: Reply) -> bool:
    """Whether the connection outlives this exchange, as h11 decides (RFC 9112 9.3)."""
    if reply.close_after or request.http_version < b"1.1":
        return False
    headers = [(k.lower(), v) for k, v in request.headers]
    headers += [(k.lower().encode(), v.encode()) for k, v in reply.headers]
    tokens = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
    return b"close" not in tokens


async def start_fake_upstream(
    nursery: trio.Nursery,
    *,
    tls: ssl.SSLContext | None = None,
    default: Reply | Handler | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> FakeUpstream:
    """Start a `FakeUpstream` in `nursery`; it is listening when this returns.

    `tls`: a server context (see `tests.support.tls.TLSMaterial.server_context`); None for
    plain HTTP. `default`: the reply once the script is empty (200 "ok" if None). `port`: a
    fixed port (e.g. another upstream's, on another loopback address); 0 for an ephemeral one.
    """
    upstream = FakeUpstream(tls=tls, default=default, host=host, port=port)
    await nursery.start(upstream.serve)
    return upstream
