"""The upstream side: a keep-alive connection pool per upstream and the client that forwards
one request over it. The client is the innermost `Handler` of every route's pipeline.

Foreign exceptions (OSError, ssl, trio) and framing errors are mapped to `core.errors` here, at the boundary.
"""

from __future__ import annotations

import logging
import math
import select
import ssl
from typing import final
from urllib.parse import quote

import trio

from resilient_ambassador.core.config import UpstreamConfig
from resilient_ambassador.core.errors import (
    ProxyError,
    StaleConnection,
    UpstreamConnectTimeout,
    UpstreamPoolTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
)
from resilient_ambassador.core.fingerprint import fingerprint
from resilient_ambassador.core.headers import inject_headers, inject_query
from resilient_ambassador.core.headers import response_headers_for_client as client_view
from resilient_ambassador.core.http1 import (
    HEAD_END,
    LAST_CHUNK,
    ChunkedDecoder,
    FramingError,
    ResponseHead,
    chunk_bytes,
    parse_response_head,
    request_head_bytes,
    valid_field_value,
)
from resilient_ambassador.core.messages import EMPTY_BODY, BufferedBody, Request, Response, header_value
from resilient_ambassador.net import sockio
from resilient_ambassador.net.resolver import Resolver
from resilient_ambassador.net.tls import client_context
from resilient_ambassador.secrets import SecretResolver

POOL_EXHAUSTED_RETRY_AFTER_S = 1.0
# A pooled connection idle for less than this is reused without the readability check (see
# ConnectionPool.checkout); servers close idle keep-alive connections after seconds, not ms.
STALE_CHECK_AFTER_S = 0.1

log = logging.getLogger("resilient_ambassador.upstream")

RECEIVE_BYTES = 65536
# Upstream response heads above this are refused (HAProxy uses 16 KiB, Varnish 32 KiB).
MAX_RESPONSE_HEAD_BYTES = 32 * 1024
MAX_RESPONSE_HEADER_COUNT = 100
# RFC 9110 9.2.2: safe to replay when we cannot know whether the first attempt was processed.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class _PeerClosed(Exception):
    """The upstream closed or reset the connection; `got_bytes` says whether any response
    byte had arrived (if not, the request may be replayed)."""

    def __init__(self, got_bytes: bool) -> None:
        super().__init__("upstream closed the connection")
        self.got_bytes = got_bytes


@final
class UpstreamConnection:
    """One TCP (or TLS) connection to the upstream, with the bytes read from it and not
    consumed yet. `reusable` turns False as soon as anything makes its framing doubtful."""

    __slots__ = ("_poller", "buffer", "conn_id", "fd", "last_used", "plain", "reusable", "stream")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType, conn_id: int):
        self.stream = stream
        self.fd = sock.fileno()
        # Plain TCP is read and written on the fd directly (net/sockio.py); TLS by its stream.
        self.plain = isinstance(stream, trio.SocketStream)
        self.buffer = bytearray()
        self.conn_id = conn_id
        self.last_used = 0.0
        self._poller: select.poll | None = None
        self.reusable = True

    async def receive(self) -> bytes:
        """Bytes from the upstream (b"" at EOF). Raises OSError, trio.BrokenResourceError."""
        if self.plain:
            return await sockio.receive(self.fd, RECEIVE_BYTES)
        return bytes(await self.stream.receive_some(RECEIVE_BYTES))

    async def receive_ready(self) -> bytes | None:
        """What has arrived (b"" at EOF), or None: over TLS always None (see `receive_wait`)."""
        return await sockio.receive_ready(self.fd, RECEIVE_BYTES) if self.plain else None

    async def receive_wait(self) -> bytes:
        """Bytes from the upstream, after `receive_ready` found none."""
        if self.plain:
            return await sockio.receive_wait(self.fd, RECEIVE_BYTES)
        return bytes(await self.stream.receive_some(RECEIVE_BYTES))

    def send_nowait(self, data: bytes) -> int:
        """How much of `data` the kernel took at once (always 0 over TLS). Raises OSError."""
        return sockio.send_nowait(self.fd, data) if self.plain else 0

    async def send(self, data: bytes, sent: int = 0) -> None:
        """The rest of `data`, from offset `sent`, waiting for room as needed."""
        if self.plain:
            await sockio.send_all(self.fd, data, sent)
        else:
            await self.stream.send_all(memoryview(data)[sent:])

    def looks_stale(self) -> bool:
        """An idle keep-alive connection must have nothing to read: readable means the peer
        closed it (EOF) or sent something unsolicited; either way it must not be reused."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.fd, select.POLLIN)
        return bool(self._poller.poll(0))

    def close(self) -> None:
        """Close at once, without a TLS close_notify: used for discarded connections."""
        sock = _raw_socket(self.stream)
        sock.close()


def _raw_socket(stream: trio.abc.Stream) -> trio.socket.SocketType:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    return stream.socket


@final
class ConnectionPool:
    """LIFO pool of idle keep-alive connections. At most `max_connections` exist at once;
    the most recently used idle connection is reused first (it is the least likely to have
    been closed by the peer)."""

    def __init__(self, config: UpstreamConfig, resolver: Resolver | None = None) -> None:
        self.config = config
        self._resolver = resolver or Resolver()  # the app passes its one shared resolver
        self._ssl: ssl.SSLContext | None = client_context(config.tls) if config.url.uses_tls else None
        self._idle: list[UpstreamConnection] = []
        self._slots = trio.Semaphore(config.pool.max_connections)
        self._next_id = 0
        self.connections_opened = 0

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return self.config.pool.max_connections - self._slots.value

    async def acquire(self, *, fresh: bool = False) -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused from the pool."""
        await self.reserve()
        return await self.checkout(fresh=fresh)

    async def reserve(self, deadline: float = math.inf) -> None:
        """Take a connection slot, waiting at most `acquire_timeout_s` (or until `deadline`).
        Running out is local saturation, UpstreamPoolTimeout, never the upstream's fault."""
        try:
            self._slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        timeout_s = self.config.pool.acquire_timeout_s
        with trio.move_on_at(min(trio.current_time() + timeout_s, deadline)):
            await self._slots.acquire()
            return
        # Retry-After 1: local saturation clears as soon as requests in flight finish.
        raise UpstreamPoolTimeout(
            f"no free connection within {timeout_s:g}s or the attempt's deadline",
            upstream=self.config.name,
            retry_after_s=POOL_EXHAUSTED_RETRY_AFTER_S,
        )

    async def checkout(
        self, *, fresh: bool = False, replayable: bool = False
    ) -> tuple[UpstreamConnection, bool]:
        """With a slot reserved: an idle connection (and True), or a new one (and False). The
        slot is given back if this fails. `replayable`: the request may be sent again should
        the connection turn out closed, so one idle only for a moment needs no check."""
        try:
            if not fresh:
                now = trio.current_time()
                while self._idle:
                    conn = self._idle.pop()
                    idle_s = now - conn.last_used
                    # Under load a connection is back within milliseconds: the peer closing it
                    # in that window is rare, and a replay covers it, so no syscall for it.
                    if (replayable and idle_s < STALE_CHECK_AFTER_S) or (
                        idle_s < self.config.pool.idle_timeout_s and not conn.looks_stale()
                    ):
                        return conn, True
                    conn.close()
            return await self._connect(), False
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose exchange completed cleanly; anything else is discarded."""
        if conn.reusable and not conn.buffer:  # bytes after the body: framing doubt, never reuse
            conn.last_used = trio.current_time()
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    def discard(self, conn: UpstreamConnection) -> None:
        conn.close()
        self._slots.release()

    def expire_idle(self) -> None:
        """Close idle connections past their idle timeout (called periodically by the app)."""
        now = trio.current_time()
        keep = []
        for conn in self._idle:
            if now - conn.last_used < self.config.pool.idle_timeout_s and not conn.looks_stale():
                keep.append(conn)
            else:
                conn.close()
        self._idle = keep

    def close_idle(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def _connect(self) -> UpstreamConnection:
        url = self.config.url
        name = self.config.name
        timeout_s = self.config.timeouts.connect_s
        try:
            with trio.fail_after(timeout_s):
                # DNS (cached, see net.resolver) and a connect through the answer's addresses.
                tcp = await self._resolver.connect(url.host, url.port, upstream=name)
                stream: trio.abc.Stream = tcp
                if self._ssl is not None:
                    stream = await self._handshake(tcp)
        except trio.TooSlowError:
            raise UpstreamConnectTimeout(
                f"connect to {url.host}:{url.port} timed out after {timeout_s:g}s", upstream=name
            ) from None
        self._next_id += 1
        self.connections_opened += 1
        return UpstreamConnection(stream, tcp.socket, self._next_id)

    async def _handshake(self, tcp: trio.SocketStream) -> trio.SSLStream[trio.SocketStream]:
        assert self._ssl is not None
        server_name = self.config.tls.server_name or self.config.url.host
        tls = trio.SSLStream(tcp, self._ssl, server_hostname=server_name, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            tcp.socket.close()
            cause = exc.__cause__
            detail = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
            raise UpstreamTLSError(
                f"TLS handshake with {server_name} failed: {detail or cause or 'connection lost'}",
                upstream=self.config.name,
            ) from exc
        except BaseException:
            tcp.socket.close()
            raise
        return tls


@final
class UpstreamBody:
    """The response body, streamed from the upstream connection as the client reads it, in
    the framing its head declared: Content-Length, chunked, or until the upstream closes."""

    __slots__ = ("_conn", "_decoder", "_left", "_length", "_read_idle_s", "_until_close", "_upstream", "done")

    def __init__(self, conn: UpstreamConnection, head: ResponseHead, read_idle_s: float, upstream: str):
        self._conn = conn
        self._length = head.content_length
        self._left = head.content_length or 0
        self._decoder = ChunkedDecoder() if head.chunked else None
        self._until_close = head.content_length is None and not head.chunked
        self._read_idle_s = read_idle_s
        self._upstream = upstream
        self.done = head.content_length == 0

    @property
    def length(self) -> int | None:
        return self._length

    @property
    def replayable(self) -> bool:
        return False

    def ready(self) -> bool:
        """Whether the next chunk (or the end) is already buffered: the server then coalesces
        it into the same write instead of flushing."""
        return self.done or (self._decoder is None and bool(self._conn.buffer))

    def __aiter__(self) -> UpstreamBody:
        return self

    async def __anext__(self) -> bytes:
        buffer = self._conn.buffer
        decoder = self._decoder
        while not self.done:
            if decoder is not None:
                try:
                    data = decoder.decode(buffer)
                except FramingError as exc:
                    raise UpstreamProtocolError(
                        f"bad response body: {exc.message}", upstream=self._upstream
                    ) from None
                self.done = decoder.done
                if data:
                    return data
                if self.done:
                    break
            elif buffer:
                if self._until_close:
                    data = bytes(buffer)
                    buffer.clear()
                    return data
                data = bytes(buffer[: self._left])
                del buffer[: len(data)]
                self._left -= len(data)
                self.done = self._left == 0
                return data
            received = await self._receive()
            if not received:
                if self._until_close:
                    self.done = True
                    break
                raise UpstreamProtocolError(
                    "upstream closed the connection mid-body", upstream=self._upstream
                )
            buffer += received
        raise StopAsyncIteration

    async def _receive(self) -> bytes:
        with trio.CancelScope(deadline=trio.current_time() + self._read_idle_s):
            try:
                return await self._conn.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise UpstreamProtocolError(
                    "upstream reset the connection mid-body", upstream=self._upstream
                ) from None
        raise UpstreamTimeout(f"response body stalled for {self._read_idle_s:g}s", upstream=self._upstream)


@final
class UpstreamClient:
    """Forwards a request to one upstream: injects configured headers/query parameters (the
    only place credentials are added), replays once on a stale pooled connection."""

    def __init__(self, config: UpstreamConfig, pool: ConnectionPool, secrets: SecretResolver):
        self.config = config
        self.pool = pool
        self._secrets = secrets
        self._header_names = [(name.lower().encode(), tpl) for name, tpl in config.headers]
        self._query_names = [(quote(name, safe="").encode(), tpl) for name, tpl in config.query]
        self._base_path = config.url.base_path.encode()
        self._has_secrets = any(t.is_secret for _, t in (*config.headers, *config.query))

    def credential_fingerprint(self) -> str:
        """A hash of the credentials this client injects now ("" when it injects none): what
        rate limits and cache entries are partitioned by, never the credential itself. It
        changes when a rotated secret file changes."""
        if not self._has_secrets:
            return ""
        values = [
            self._secrets.resolve(tpl).encode()
            for _, tpl in (*self._header_names, *self._query_names)
            if tpl.is_secret
        ]
        return fingerprint(values, domain=b"credential")

    def _secret_values(self) -> list[bytes]:
        if not self._has_secrets:
            return []
        return [v.encode() for v in self._secrets.secret_values()]

    def _outgoing(self, request: Request) -> bytes:
        """The request head as the upstream gets it: credentials injected at this very last
        step (no stage, log or span ever holds them)."""
        injected = [(name, self._secrets.resolve(tpl).encode()) for name, tpl in self._header_names]
        if any(not valid_field_value(value) for _, value in injected):
            raise ProxyError("an injected header value is not a valid field value", upstream=self.config.name)
        headers = inject_headers(request.headers, injected)
        target = request.target
        if self._base_path and target != b"*":
            target = self._base_path + target
        target = inject_query(
            target,
            ((name, quote(self._secrets.resolve(tpl), safe="").encode()) for name, tpl in self._query_names),
        )
        try:
            return request_head_bytes(request.method, target, headers)
        except ValueError:
            raise ProxyError("a request header holds CR or LF", upstream=self.config.name) from None

    async def __call__(self, request: Request) -> Response:
        # The wait for a pool slot stays outside the attempt deadline's scope: running out there
        # is our saturation (UpstreamPoolTimeout), not the upstream's slowness.
        outgoing = self._outgoing(request)
        request.outcome.attempts += 1
        await self.pool.reserve(request.deadline)
        if request.deadline == math.inf:
            return await self._forward(request, outgoing)
        with trio.move_on_at(request.deadline):
            return await self._forward(request, outgoing)
        raise UpstreamTimeout("no response within the per-try timeout", upstream=self.config.name)

    async def _forward(self, request: Request, outgoing: bytes) -> Response:
        """With a slot reserved: check out a connection and exchange; replay once on a stale
        pooled connection when that is safe. A stale connection that cannot be replayed is
        reported as such (StaleConnection): a keep-alive race, not the upstream's failure."""
        replayable = request.body.replayable and request.method in IDEMPOTENT_METHODS
        conn, reused = await self.pool.checkout(replayable=replayable)
        try:
            return await self._exchange(conn, reused, outgoing, request)
        except StaleConnection:
            if not replayable:
                raise
            log.debug("replaying %s on a fresh connection to %s", request.method, self.config.name)
            conn, _ = await self.pool.acquire(fresh=True)
            return await self._exchange(conn, False, outgoing, request)

    async def _exchange(
        self, conn: UpstreamConnection, reused: bool, outgoing: bytes, request: Request
    ) -> Response:
        name = self.config.name
        try:
            try:
                await self._send_request(conn, outgoing, request)
                head = await self._receive_head(conn, request.method, self.config.timeouts.response_s)
            except _PeerClosed as exc:
                if exc.got_bytes or not reused:
                    raise UpstreamProtocolError("upstream closed the connection", upstream=name) from None
                raise StaleConnection("upstream closed the connection", upstream=name) from None
            except trio.TooSlowError:
                raise UpstreamTimeout(
                    f"no response within {self.config.timeouts.response_s:g}s", upstream=name
                ) from None
            except FramingError as exc:
                raise UpstreamProtocolError(f"invalid response: {exc.message}", upstream=name) from None
        except BaseException:
            self.pool.discard(conn)
            raise
        if len(head.headers) > MAX_RESPONSE_HEADER_COUNT:
            self.pool.discard(conn)
            raise UpstreamProtocolError("too many response header fields", upstream=name)
        conn.reusable = head.keep_alive
        forwarded = client_view(head.headers, self._secret_values())
        if head.chunked and head.content_length is None and any(n == b"content-length" for n, _ in forwarded):
            # RFC 9112 6.3: Transfer-Encoding wins over a Content-Length sent with it.
            forwarded = [(n, v) for n, v in forwarded if n != b"content-length"]
        length = head.content_length
        if length is not None and not head.chunked and len(conn.buffer) >= length:
            # The whole body came with the head (most API answers): take it, and give the
            # connection back now rather than when the client has been answered.
            buffer = conn.buffer
            body = BufferedBody(bytes(buffer[:length])) if length else EMPTY_BODY
            del buffer[:length]
            if buffer:
                self.pool.discard(conn)  # bytes after the body: nothing we asked for
            else:
                self.pool.release(conn)
            return Response(status=head.status, headers=forwarded, body=body, reason=head.reason)
        upstream_body = UpstreamBody(conn, head, self.config.timeouts.read_idle_s, name)

        def release() -> None:
            if upstream_body.done:
                self.pool.release(conn)
            else:
                self.pool.discard(conn)

        return Response(
            status=head.status,
            headers=forwarded,
            body=upstream_body,
            reason=head.reason,
            release=release,
        )

    async def _send_request(self, conn: UpstreamConnection, outgoing: bytes, request: Request) -> None:
        """The head, then the body in the framing the head declares: chunked when the client
        sent it chunked (the head carries Transfer-Encoding), else its Content-Length."""
        body = request.body
        if body.length == 0:
            await self._send(conn, outgoing)
            return
        chunked = header_value(request.headers, b"transfer-encoding") is not None
        out = outgoing
        async for chunk in body:
            out += chunk_bytes(chunk) if chunked else chunk
            await self._send(conn, out)
            out = b""
        await self._send(conn, out + LAST_CHUNK if chunked else out)

    async def _send(self, conn: UpstreamConnection, data: bytes) -> None:
        """Write to the upstream; one that stops reading for `read_idle_s` is given up on."""
        try:
            sent = conn.send_nowait(data)
        except OSError:
            raise _PeerClosed(False) from None
        if sent == len(data):
            return  # the kernel took it all: no clock, no scope, no scheduling
        timeout_s = self.config.timeouts.read_idle_s
        with trio.CancelScope(deadline=trio.current_time() + timeout_s):  # bare: hot path
            try:
                await conn.send(data, sent)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise _PeerClosed(False) from None
        raise UpstreamTimeout(
            f"upstream stopped reading the request for {timeout_s:g}s", upstream=self.config.name
        )

    async def _receive_head(self, conn: UpstreamConnection, method: bytes, timeout_s: float) -> ResponseHead:
        """The final response head (1xx interim responses are skipped: we sent the whole
        body already), within `timeout_s` of first having to wait for it. Raises _PeerClosed,
        FramingError, trio.TooSlowError."""
        buffer = conn.buffer
        got_bytes = bool(buffer)
        deadline: float | None = None
        while True:
            end = buffer.find(HEAD_END)
            if end == -1:
                if len(buffer) > MAX_RESPONSE_HEAD_BYTES:
                    raise FramingError("response head too large")
                try:
                    data = await conn.receive_ready()
                    if data is None:
                        # Only now a deadline: under load the answer is usually in already.
                        if deadline is None:
                            deadline = trio.current_time() + timeout_s
                        with trio.move_on_at(deadline):
                            data = await conn.receive_wait()
                        if data is None:
                            raise trio.TooSlowError
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    raise _PeerClosed(got_bytes) from None
                if not data:
                    raise _PeerClosed(got_bytes)
                got_bytes = True
                buffer += data
                continue
            if end + 4 > MAX_RESPONSE_HEAD_BYTES:
                raise FramingError("response head too large")
            raw = bytes(buffer[: end + 4])
            del buffer[: end + 4]
            head = parse_response_head(raw, method)
            if head.status >= 200:
                return head
            if head.status == 101:
                raise FramingError("unrequested protocol switch")
