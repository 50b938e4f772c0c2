"""The downstream side: an HTTP/1.1 keep-alive server on trio that hands each request to its
route's pipeline and streams the response back.

Syntax and framing are core/http1.py's; this module adds what needs a clock and a socket: head
size limits on the raw bytes, a header-read deadline, a body deadline and size limit, a send
timeout, requests-per-connection, and a clean close (with a 4xx answer) for anything malformed.
See core/headers.py for the proxy rules themselves.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import final

import trio

from resilient_ambassador.core.access_log import AccessRecord
from resilient_ambassador.core.config import ClientLimits, ListenerConfig, RouteConfig
from resilient_ambassador.core.errors import (
    ClientError,
    LoopDetected,
    NoRoute,
    ProxyError,
)
from resilient_ambassador.core.headers import (
    check_request,
    forward_request_headers,
    normalize_path,
    origin_form_target,
    scan_request_head,
    via_loop,
)
from resilient_ambassador.core.http1 import (
    LAST_CHUNK,
    ChunkedDecoder,
    FramingError,
    RequestHead,
    chunk_bytes,
    declared_length,
    parse_request_head,
    response_head_bytes,
)
from resilient_ambassador.core.log_throttle import LogThrottle
from resilient_ambassador.core.messages import (
    EMPTY_BODY,
    Body,
    BufferedBody,
    Handler,
    Headers,
    Request,
    Response,
)
from resilient_ambassador.core.routing import Router
from resilient_ambassador.net import sockio
from resilient_ambassador.net.access_log import AccessLog

log = logging.getLogger("resilient_ambassador.server")

RECEIVE_BYTES = 65536
# This process in `Via` (as a comment after our pseudonym): a request that comes back with it
# is a loop (508). Random per process; it says nothing about the deployment.
INSTANCE_ID = os.urandom(4).hex().encode()
# Flush what we coalesced once it reaches this size, even if more is ready.
FLUSH_BYTES = 65536
REASON_HEADER = b"x-ambassador-error"
# After answering a bad request: how long and how much of the client's leftover we read
# before closing (nginx lingering_timeout is 5 s; we only need the answer to get through).
LINGER_S = 1.0
LINGER_BYTES = 256 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientGone(Exception):
    """The client closed or reset the connection; nothing can be sent to it. `reason`: why we
    cut it ourselves (a response that failed mid-body), for the access log."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason


@final
@dataclass(frozen=True, slots=True)
class RouteRuntime:
    """What the server needs per route: its config, its pipeline and the upstream Host."""

    config: RouteConfig
    handler: Handler
    upstream_host: bytes


_PHRASES = {int(status): status.phrase.encode() for status in HTTPStatus}


def _phrase(status: int) -> bytes:
    return _PHRASES.get(status, b"")


def error_headers(error: ProxyError, body: bytes) -> Headers:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (REASON_HEADER, error.reason.encode()),
        (b"cache-control", b"no-store"),
    ]
    if error.retry_after_s is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(error.retry_after_s))).encode()))
    headers.extend(error.extra_headers)
    return headers


def error_response(error: ProxyError, *, head: bool = False) -> Response:
    """The daemon's own answer: a short JSON body and a reason header, never header values.
    `head`: the answer to a HEAD request, with the same headers and no content (RFC 9110
    9.3.2); content there would be taken as the next response, so the server aborts instead."""
    body = error.body()
    return Response(
        status=error.status,
        headers=error_headers(error, body),
        body=EMPTY_BODY if head else BufferedBody(body),
        reason=_phrase(error.status),
    )


async def linger_close(stream: trio.SocketStream, seconds: float, max_bytes: int) -> None:
    """Half-close, then read and discard what the client still sends for a moment (nginx's
    lingering close), so our answer is not destroyed by the RST that closing on unread data
    would cause."""
    try:
        await stream.send_eof()
        with trio.move_on_after(seconds):
            discarded = 0
            while discarded < max_bytes:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    break
                discarded += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


@final
class HttpServer:
    """Serves one listener. `draining` makes every connection close after its current
    request; idle keep-alive connections are woken and closed at once."""

    def __init__(self, config: ListenerConfig, routes: Mapping[int, RouteRuntime]) -> None:
        self.config = config
        self.limits = config.limits
        self.router = Router(config.routes)
        self.routes = routes  # keyed by id(RouteConfig)
        self.draining = False
        self.open_connections = 0
        # Totals for the admin /stats: requests whose head was read, responses by status class
        # (index 1..5 = 1xx..5xx; 100 Continue is not counted).
        self.requests = 0
        self.responses = [0] * 6
        self._idle_scopes: set[trio.CancelScope] = set()
        self.log_throttle = LogThrottle()
        self.access_log: AccessLog | None = None

    def swap(self, config: ListenerConfig, routes: Mapping[int, RouteRuntime]) -> None:
        """A reload: new connections and requests use `config` and `routes` from now on; a
        request already routed keeps its RouteRuntime, a connection its limits."""
        self.config = config
        self.limits = config.limits
        self.router = Router(config.routes)
        self.routes = routes

    def count_response(self, status: int) -> None:
        self.responses[min(status // 100, 5)] += 1

    def start_drain(self) -> None:
        self.draining = True
        for scope in self._idle_scopes:
            scope.cancel()

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        if self.open_connections >= self.limits.max_connections:
            log.warning(
                "listener %s: connection cap %d reached, refusing",
                self.config.name,
                self.limits.max_connections,
            )
            stream.socket.close()
            return
        self.open_connections += 1
        try:
            await ClientConnection(self, stream).run()
        finally:
            self.open_connections -= 1
            stream.socket.close()


@final
class DownstreamBody:
    """The request body, read from the client as the upstream side consumes it."""

    __slots__ = (
        "_client",
        "_deadline",
        "_decoder",
        "_expect_continue",
        "_left",
        "_length",
        "_received",
        "_started",
        "done",
        "limit",
    )

    def __init__(self, client: ClientConnection, head: RequestHead) -> None:
        self._client = client
        self._expect_continue = head.expect_continue
        self._length = head.content_length
        self._left = head.content_length or 0
        self._decoder = (
            ChunkedDecoder(
                max_trailers=client.limits.max_header_count, max_trailer_bytes=client.limits.max_header_bytes
            )
            if head.chunked
            else None
        )
        self.limit = math.inf  # the route's, once routed
        self._received = 0
        self._started = False
        self._deadline = math.inf
        self.done = False

    @property
    def length(self) -> int | None:
        return self._length

    @property
    def replayable(self) -> bool:
        return False

    def ready(self) -> bool:
        return False

    def __aiter__(self) -> DownstreamBody:
        return self

    async def __anext__(self) -> bytes:
        if self.done:
            raise StopAsyncIteration
        client = self._client
        buffer = client.buffer
        if not self._started:
            self._started = True
            self._deadline = client.now() + client.limits.body_read_timeout_s
            if self._expect_continue and not buffer:
                await client.send(CONTINUE)
        decoder = self._decoder
        while True:
            if decoder is None:
                if buffer:
                    data = bytes(buffer[: self._left])
                    del buffer[: len(data)]
                    self._left -= len(data)
                    self.done = self._left == 0
                    return data
            else:
                try:
                    data = decoder.decode(buffer)
                except FramingError as exc:
                    raise _client_error(exc, "bad request body: ") from None
                self._received += len(data)
                # A chunk counts at its declared size: one claiming 2**64 bytes is refused now,
                # not after a megabyte has been streamed upstream or the body timeout.
                if self._received + decoder.declared_left > self.limit:
                    raise ClientError(413, "body_too_large", "request body too large")
                if decoder.done:
                    self.done = True
                    if data:
                        return data
                    raise StopAsyncIteration
                if data:
                    return data
            received = await client.receive(self._deadline, "request body timeout")
            if not received:
                raise ClientGone()
            buffer += received


# The daemon's error reasons for the statuses the parser picks (any other, 501 included, is a
# `bad_request`: see docs/architecture.md, "Error responses").
_REASON_BY_STATUS = {413: "body_too_large", 431: "headers_too_large", 505: "http_version_not_supported"}


def _client_error(exc: FramingError, context: str = "") -> ClientError:
    return ClientError(exc.status, _REASON_BY_STATUS.get(exc.status, "bad_request"), context + exc.message)


@final
class ClientConnection:
    """One downstream connection: a loop of read head -> route -> forward -> respond."""

    __slots__ = (
        "buffer",
        "fd",
        "head_method",
        "keep_alive",
        "limits",
        "now",
        "peer_ip",
        "request_body",
        "requests_served",
        "response_started",
        "server",
        "stream",
    )

    def __init__(self, server: HttpServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.fd = stream.socket.fileno()  # plain TCP: read and written directly (net/sockio.py)
        # The run's clock, read directly (`trio.current_time` costs three frames per call): the
        # one clock every deadline and timestamp of this connection comes from.
        self.now = trio.lowlevel.current_clock().current_time
        self.limits: ClientLimits = server.limits
        self.buffer = bytearray()  # bytes read from the client and not consumed yet
        self.requests_served = 0
        # The method of the head being answered, read from the raw bytes: a request the parser
        # rejects still gets a bodiless answer if it was a HEAD.
        self.head_method = b""
        self.keep_alive = True
        self.response_started = False
        # The body of the request being served, while it may still be unread (None: none).
        self.request_body: DownstreamBody | None = None
        try:
            self.peer_ip = str(stream.socket.getpeername()[0]).encode()
        except OSError:
            self.peer_ip = b"unknown"

    @property
    def request_complete(self) -> bool:
        """Whether the current request's body has been read to its end."""
        return self.request_body is None or self.request_body.done

    async def run(self) -> None:
        try:
            while True:
                try:
                    head = await self._read_head()
                except ClientError as exc:
                    if self.server.access_log is not None:
                        self._record(None, self.now(), exc.status, 0, exc.reason)
                    raise
                if head is None:
                    return
                if not await self._serve(head):
                    break
        except ClientGone:
            return
        except ClientError as exc:
            await self._answer_and_close(exc)
            return
        if not self.request_complete:
            await self._linger()  # we answered without reading the whole body

    # -- reading ---------------------------------------------------------------------------

    async def receive(self, deadline: float, timeout_reason: str) -> bytes:
        try:
            data = await sockio.receive_ready(self.fd, RECEIVE_BYTES)
            if data is not None:
                return data
            with trio.move_on_at(deadline):
                return await sockio.receive_wait(self.fd, RECEIVE_BYTES)
        except OSError:
            raise ClientGone() from None
        raise ClientError(408, "request_timeout", timeout_reason)

    async def _read_head(self) -> RequestHead | None:
        """The next request head, validated; None when the client closed or went idle."""
        limits = self.limits
        buffer = self.buffer
        self.head_method = b""
        self.response_started = False
        self.request_body = None
        first_request = self.requests_served == 0
        # The head's deadline starts when its first bytes are in (header_read_timeout), and is
        # only read off the clock if they do not bring the whole head.
        deadline: float | None = None
        while True:
            if buffer:
                while buffer.startswith(b"\r\n"):  # RFC 9112 2.2: ignore empty lines before a request
                    del buffer[:2]
                self.head_method = bytes(buffer[:5])  # before the scan, which may reject the head
                head_length = scan_request_head(buffer, limits)
                if head_length:
                    raw = bytes(buffer[:head_length])
                    del buffer[:head_length]
                    break
                if deadline is None:
                    deadline = self.now() + limits.header_read_timeout_s
                data = await self.receive(deadline, "request header timeout")
            else:
                if self.server.draining:
                    return None
                idle_s = limits.header_read_timeout_s if first_request else limits.keepalive_timeout_s
                received = await self._wait_for_request(idle_s)
                if received is None:
                    return None  # gone, keep-alive idle timeout or drain: close quietly
                data = received
            if not data:
                if buffer:
                    raise ClientGone()  # half a head, then EOF: nothing to answer
                return None
            buffer += data
        try:
            head = parse_request_head(raw)
        except FramingError as exc:
            raise _client_error(exc) from None
        # HTTP/1.0 clients get one response per connection: no `Connection: keep-alive` dance.
        self.keep_alive = head.keep_alive and head.version == b"1.1"
        return head

    async def _wait_for_request(self, idle_s: float) -> bytes | None:
        """The first bytes of the next request (b"" at EOF), or None when the client went
        away, stayed idle for `idle_s`, or the listener is draining. Under load they are usually
        there already, and no idle scope is needed."""
        try:
            data = await sockio.receive_ready(self.fd, RECEIVE_BYTES)
            if data is not None:
                return data
            if self.server.draining:
                return None  # began while we yielded: the drain wakes only idle scopes it can see
            with trio.CancelScope(deadline=self.now() + idle_s) as idle:
                self.server._idle_scopes.add(idle)
                try:
                    return await sockio.receive_wait(self.fd, RECEIVE_BYTES)
                finally:
                    self.server._idle_scopes.discard(idle)
        except OSError:
            return None
        return None  # keep-alive idle timeout, or the drain woke it

    # -- serving ---------------------------------------------------------------------------

    def _build_request(self, head: RequestHead) -> tuple[Request, RouteRuntime]:
        headers = head.headers
        check_request(head.method, head.target)
        host = head.host
        # Set before routing: a request refused unread still has its body on the wire.
        self.request_body = DownstreamBody(self, head) if head.has_body else None
        if (loop := via_loop(headers, INSTANCE_ID)) is not None:
            raise LoopDetected(loop)
        target = normalize_path(origin_form_target(head.target, host))
        match = self.server.router.match(host, target)
        if match is None:
            raise NoRoute("no route for this host and path")
        route_config, upstream_target = match
        route = self.server.routes[id(route_config)]
        limit = route_config.max_request_body_bytes
        if head.content_length is not None and head.content_length > limit:
            # Before any 100 Continue: the client need not send the body at all.
            raise ClientError(413, "body_too_large", "request body too large")
        body: Body = EMPTY_BODY
        if self.request_body is not None:
            body = self.request_body
            self.request_body.limit = limit
        request = Request(
            method=head.method,
            target=upstream_target,
            headers=forward_request_headers(
                headers,
                upstream_host=route.upstream_host,
                client_ip=self.peer_ip,
                downstream_scheme=b"http",
                chunked_body=head.chunked,
                instance=INSTANCE_ID,
            ),
            body=body,
            http_version=head.version,
            client_ip=self.peer_ip,
        )
        return request, route

    async def _serve(self, head: RequestHead) -> bool:
        """Serve one request; True when the connection may carry another."""
        self.requests_served += 1
        self.server.requests += 1
        started = self.now()
        route: RouteRuntime | None = None
        request: Request | None = None
        status, sent, reason, completed = 0, 0, None, False
        is_head = head.method == b"HEAD"
        try:
            try:
                request, route = self._build_request(head)
            except ClientError:
                raise
            except ProxyError as exc:
                self._log_error(head, exc)
                status, reason = exc.status, exc.reason
                sent = await self._respond(error_response(exc, head=is_head), is_head)
                completed = True
                return self._reusable()
            try:
                response = await route.handler(request)
            except ClientError:
                raise
            except ProxyError as exc:
                self._log_error(head, exc, route.config.upstream)
                response = error_response(exc, head=is_head)
                reason = exc.reason
            status = response.status
            sent = await self._respond(response, is_head)
            completed = True
            return self._reusable()
        except ClientError as exc:
            # Answered by `run` (unless a response is already under way).
            status = status or exc.status
            reason = exc.reason
            raise
        except ClientGone as exc:
            reason = reason or exc.reason  # a body cut short by the upstream is logged as such
            raise
        finally:
            if self.server.access_log is not None:
                self._record(head, started, status, sent, reason, route, request, aborted=not completed)

    def _record(
        self,
        head: RequestHead | None,
        started: float,
        status: int,
        sent: int,
        reason: str | None,
        route: RouteRuntime | None = None,
        request: Request | None = None,
        *,
        aborted: bool = False,
    ) -> None:
        access_log = self.server.access_log
        assert access_log is not None
        elapsed = self.now() - started
        outcome = request.outcome if request is not None else None
        # Positional, in field order: this runs for every request.
        access_log.record(
            AccessRecord(
                time.time() - elapsed,
                self.server.config.name,
                self.peer_ip,
                head.method if head is not None else b"-",
                head.target if head is not None else b"-",
                status,
                sent,
                elapsed,
                (route.config.name or None) if route is not None else None,
                route.config.upstream if route is not None else None,
                outcome,
                reason,
                aborted,
                outcome.trace_id if outcome is not None else None,
            )
        )

    def _reusable(self) -> bool:
        return self.keep_alive and self.request_complete

    async def _respond(self, response: Response, is_head: bool) -> int:
        """Send a response, coalescing head, body chunks and end into as few writes as the
        body allows. The framing is ours (RFC 9112 6): the Content-Length the response carries,
        else chunked (or, to an HTTP/1.0 client, the close). A body that disagrees with its
        Content-Length, or an upstream failure after the head went out, aborts the connection:
        the client must never mistake a truncated body for a complete one."""
        status = response.status
        headers = response.headers
        sent = 0
        # An unread request body cannot be skipped safely: say we close.
        if (
            not self.request_complete
            or self.server.draining
            or self.requests_served >= self.limits.max_requests_per_connection
        ):
            self.keep_alive = False
        bodiless = is_head or status in (204, 304)
        try:
            length = None if bodiless else declared_length(headers)
        except FramingError:
            response.release()
            raise self._aborted("invalid Content-Length in the response") from None
        chunked = not bodiless and length is None and self.keep_alive
        if not bodiless and length is None and not chunked:
            self.keep_alive = False  # close-delimited: the end of the body is our close
        if chunked:
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        if not self.keep_alive:
            headers = [*headers, (b"connection", b"close")]
        try:
            try:
                out = response_head_bytes(status, response.reason or _phrase(status), headers)
            except ValueError:
                raise self._aborted("invalid response header") from None
            self.response_started = True
            self.server.count_response(status)
            body = response.body
            if type(body) is BufferedBody:  # a cache hit or our own answer: one write, no iteration
                return await self._send_whole(out, body.data, length, bodiless, chunked)
            if not body.ready():
                await self.send(out)
                out = b""
            async for chunk in body:
                sent += len(chunk)
                if bodiless:
                    if chunk:
                        raise self._aborted("content in a bodiless response")
                    continue
                if length is not None and sent > length:
                    raise self._aborted("body longer than its Content-Length")
                out += chunk_bytes(chunk) if chunked else chunk
                if len(out) >= FLUSH_BYTES or not body.ready():
                    await self.send(out)
                    out = b""
            if length is not None and sent != length and not bodiless:
                raise self._aborted("body shorter than its Content-Length")
            if chunked:
                out += LAST_CHUNK
            await self.send(out)
            return sent
        except ProxyError as exc:
            self._log_abort(exc.reason, exc.message)
            raise ClientGone(exc.reason) from None
        finally:
            response.release()

    async def _send_whole(
        self, head: bytes, data: bytes, length: int | None, bodiless: bool, chunked: bool
    ) -> int:
        """`_respond` for a body already in memory, with the same checks."""
        if bodiless:
            if data:
                raise self._aborted("content in a bodiless response")
            await self.send(head)
            return 0
        if length is not None and len(data) != length:
            longer_or_shorter = "longer" if len(data) > length else "shorter"
            raise self._aborted(f"body {longer_or_shorter} than its Content-Length")
        await self.send(head + (chunk_bytes(data) + LAST_CHUNK if chunked else data))
        return len(data)

    def _aborted(self, message: str) -> ClientGone:
        """Log why a response is being cut off; the caller raises what this returns."""
        self._log_abort("response_aborted", message)
        return ClientGone("response_aborted")

    def _log_abort(self, reason: str, message: str) -> None:
        # Throttled like every per-request warning: an upstream resetting mid-body at 1,000
        # req/s must not write 1,000 lines a second.
        suppressed = self.server.log_throttle.allow(("abort", reason), self.now())
        if suppressed is not None:
            log.warning(
                "aborting response to client: %s%s",
                message,
                f" (+{suppressed} more like it)" if suppressed else "",
            )

    async def send(self, data: bytes) -> None:
        try:
            sent = sockio.send_nowait(self.fd, data)
            if sent == len(data):
                return  # the kernel took it all: no clock, no scope, no scheduling
        except OSError:
            raise ClientGone() from None
        # A bare CancelScope rather than fail_after: the context-manager wrapper is measurable.
        with trio.CancelScope(deadline=self.now() + self.limits.send_timeout_s):
            try:
                await sockio.send_all(self.fd, data, sent)
                return
            except OSError:
                raise ClientGone() from None
        log.info(
            "client %s stopped reading for %gs; closing", self.peer_ip.decode(), self.limits.send_timeout_s
        )
        raise ClientGone()

    async def _answer_and_close(self, error: ClientError) -> None:
        """Answer a bad request, unless a response is already under way, then close the way
        nginx's lingering close does."""
        suppressed = self.server.log_throttle.allow(("reject", error.reason), self.now())
        if suppressed is not None:
            log.info(
                "rejecting request from %s: %d %s%s",
                self.peer_ip.decode(),
                error.status,
                error.message,
                f" (+{suppressed} more like it)" if suppressed else "",
            )
        if self.response_started:
            return
        body = error.body()
        content = b"" if self.head_method == b"HEAD " else body
        head = [b"HTTP/1.1 %d %s" % (error.status, HTTPStatus(error.status).phrase.encode())]
        head.extend(name + b": " + value for name, value in error_headers(error, body))
        head.append(b"connection: close")
        self.server.count_response(error.status)
        try:
            await self.send(b"\r\n".join(head) + b"\r\n\r\n" + content)
        except ClientGone:
            return
        await self._linger()

    async def _linger(self) -> None:
        await linger_close(self.stream, LINGER_S, LINGER_BYTES)

    def _log_error(self, head: RequestHead, exc: ProxyError, upstream: str | None = None) -> None:
        suppressed = self.server.log_throttle.allow((upstream, exc.reason), self.now())
        if suppressed is None:
            return
        path = head.target.split(b"?", 1)[0][:200].decode("latin-1")
        log.warning(
            "%s %s -> %d %s (%s)%s%s",
            head.method.decode("latin-1"),
            path,
            exc.status,
            exc.reason,
            exc.message,
            f" upstream={upstream}" if upstream else "",
            f" (+{suppressed} more like it)" if suppressed else "",
        )
