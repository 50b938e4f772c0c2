"""The downstream side: an HTTP/1.1 keep-alive server (h11 on trio) that hands each request to
its route's pipeline and streams the response back.

It enforces what h11 leaves to us: head size limits on the raw bytes, a header-read deadline,
a body deadline and size limit, a send timeout, requests-per-connection, and a clean close
(with a 4xx answer) for anything malformed. See core/headers.py for the rules themselves.
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

import h11
import trio

from resilient_ambassador.core.access_log import AccessRecord, redact_target
from resilient_ambassador.core.config import ClientLimits, ListenerConfig, RouteConfig
from resilient_ambassador.core.errors import (
    ClientError,
    LoopDetected,
    NoRoute,
    ProxyError,
    describe_parse_error,
)
from resilient_ambassador.core.headers import (
    check_request,
    forward_request_headers,
    normalize_path,
    origin_form_target,
    scan_request_head,
    via_loop,
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
    9.3.2); h11 refuses to send content there, which would abort the connection instead."""
    body = error.body()
    return Response(
        status=error.status,
        headers=error_headers(error, body),
        body=EMPTY_BODY if head else BufferedBody(body),
        reason=HTTPStatus(error.status).phrase.encode(),
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
        "_length",
        "_limit",
        "_peeked",
        "_received",
        "_started",
        "done",
    )

    def __init__(self, client: ClientConnection, length: int | None, limit: int) -> None:
        self._client = client
        self._length = length
        self._limit = limit
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
        client = self._client
        h = client.h11
        if not self._started:
            self._started = True
            self._deadline = trio.current_time() + client.limits.body_read_timeout_s
            if h.they_are_waiting_for_100_continue:
                await client.send(h.send(h11.InformationalResponse(status_code=100, headers=[])))
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise ClientError(
                    exc.error_status_hint,
                    "bad_request",
                    f"bad request body: {describe_parse_error(str(exc))}",
                ) from None
            if event is h11.NEED_DATA:
                data = await client.receive(self._deadline, "request body timeout")
                h.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Data):
                self._received += len(event.data)
                # A chunk counts at its declared size: one claiming 2**64 bytes is refused now,
                # not after a megabyte has been streamed upstream or the body timeout.
                if self._received + _declared_chunk_left(h) > self._limit:
                    raise ClientError(413, "body_too_large", "request body too large")
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                if len(event.headers) > client.limits.max_header_count:
                    # Trailers are never forwarded, but h11 parses them all: cap them like headers.
                    raise ClientError(431, "headers_too_large", "too many trailer fields")
                self.done = True
                raise StopAsyncIteration
            raise ClientGone()


def _declared_chunk_left(h: h11.Connection) -> int:
    """Bytes of the current chunk still to come, as its size line declared them (0 for a
    Content-Length body). h11 keeps this private (`ChunkedReader._bytes_in_chunk`);
    tests/net/test_body_framing.py fails if that ever changes."""
    left = getattr(getattr(h, "_reader", None), "_bytes_in_chunk", 0)
    return left if isinstance(left, int) else 0


@final
class ClientConnection:
    """One downstream connection: a loop of read head -> route -> forward -> respond."""

    __slots__ = ("buffer", "h11", "head_method", "limits", "peer_ip", "requests_served", "server", "stream")

    def __init__(self, server: HttpServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.limits: ClientLimits = server.limits
        self.h11 = h11.Connection(h11.SERVER)
        self.buffer = bytearray()  # raw head bytes, scanned before h11 sees them
        self.requests_served = 0
        # The method of the head being answered, read from the raw bytes: a request h11
        # rejects still gets a bodiless answer if it was a HEAD.
        self.head_method = b""
        try:
            self.peer_ip = str(stream.socket.getpeername()[0]).encode()
        except OSError:
            self.peer_ip = b"unknown"

    async def run(self) -> None:
        try:
            while True:
                try:
                    request = await self._read_head()
                except ClientError as exc:
                    if self.server.access_log is not None:
                        self._record(None, trio.current_time(), exc.status, 0, exc.reason)
                    raise
                if request is None:
                    return
                if not await self._serve(request):
                    break
                self._next_cycle()
        except ClientGone:
            return
        except ClientError as exc:
            await self._answer_and_close(exc)
            return
        if self.h11.their_state is h11.SEND_BODY:
            await self._linger()  # we answered without reading the whole body

    # -- reading ---------------------------------------------------------------------------

    async def receive(self, deadline: float, timeout_reason: str) -> bytes:
        with trio.move_on_at(deadline):
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise ClientGone() from None
            return data
        raise ClientError(408, "request_timeout", timeout_reason)

    async def _read_head(self) -> h11.Request | None:
        """The next request head, validated; None when the client closed or went idle."""
        limits = self.limits
        buffer = self.buffer
        self.head_method = b""
        first_request = self.requests_served == 0
        idle_timeout = limits.header_read_timeout_s if first_request else limits.keepalive_timeout_s
        deadline = trio.current_time() + idle_timeout
        while True:
            if buffer:
                self.head_method = bytes(buffer[:5])  # before the scan, which may reject the head
                if scan_request_head(buffer, limits).complete:
                    self.h11.receive_data(bytes(buffer))
                    buffer.clear()
                    break
                data = await self.receive(deadline, "request header timeout")
            else:
                if self.server.draining:
                    return None
                with trio.CancelScope(deadline=deadline) as idle:
                    self.server._idle_scopes.add(idle)
                    try:
                        data = await self.stream.receive_some(RECEIVE_BYTES)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        return None
                    finally:
                        self.server._idle_scopes.discard(idle)
                if idle.cancelled_caught:
                    return None  # keep-alive idle timeout or drain: close quietly
                deadline = trio.current_time() + limits.header_read_timeout_s
            if not data:
                if buffer:
                    raise ClientGone()  # half a head, then EOF: nothing to answer
                return None
            buffer += data
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise ClientError(exc.error_status_hint, "bad_request", describe_parse_error(str(exc))) from None
        if type(event) is not h11.Request:
            raise ClientError(400, "bad_request", "malformed request")
        return event

    def _next_cycle(self) -> None:
        """Start the next request; bytes the client pipelined after this request go back into
        our scan buffer (on a fresh h11 state) so they pass the same raw-head checks."""
        leftover, _ = self.h11.trailing_data
        if leftover:
            self.h11 = h11.Connection(h11.SERVER)
            self.buffer += leftover
        else:
            self.h11.start_next_cycle()

    # -- serving ---------------------------------------------------------------------------

    def _build_request(self, event: h11.Request) -> tuple[Request, RouteRuntime]:
        headers: Headers = list(event.headers)
        check_request(event.method, event.target, event.http_version, headers)
        host = None
        length: int | None = None
        chunked = False
        for name, value in headers:
            if name == b"host":
                host = value
            elif name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        has_body = chunked or bool(length)
        if not has_body:
            self.h11.next_event()  # the EndOfMessage of a bodiless request: no I/O needed
        if (loop := via_loop(headers, INSTANCE_ID)) is not None:
            raise LoopDetected(loop)
        target = normalize_path(origin_form_target(event.target, host))
        match = self.server.router.match(host, target)
        if match is None:
            raise NoRoute("no route for this host and path")
        route_config, upstream_target = match
        route = self.server.routes[id(route_config)]
        limit = route_config.max_request_body_bytes
        if length is not None and length > limit:
            # Before any 100 Continue: the client need not send the body at all.
            raise ClientError(413, "body_too_large", "request body too large")
        body: Body = DownstreamBody(self, length, limit) if has_body else EMPTY_BODY
        request = Request(
            method=event.method,
            target=upstream_target,
            headers=forward_request_headers(
                headers,
                upstream_host=route.upstream_host,
                client_ip=self.peer_ip,
                downstream_scheme=b"http",
                chunked_body=chunked,
                instance=INSTANCE_ID,
            ),
            body=body,
            http_version=event.http_version,
            client_ip=self.peer_ip,
        )
        return request, route

    async def _serve(self, event: h11.Request) -> bool:
        """Serve one request; True when the connection may carry another."""
        self.requests_served += 1
        self.server.requests += 1
        started = trio.current_time()
        route: RouteRuntime | None = None
        request: Request | None = None
        status, sent, reason, completed = 0, 0, None, False
        try:
            try:
                request, route = self._build_request(event)
            except ClientError:
                raise
            except ProxyError as exc:
                self._log_error(event, exc)
                status, reason = exc.status, exc.reason
                # An unread request body cannot be skipped safely: say we close.
                sent = await self._respond(
                    error_response(exc, head=event.method == b"HEAD"),
                    close=self.h11.their_state is not h11.DONE,
                )
                completed = True
                return self._reusable()
            try:
                response = await route.handler(request)
            except ClientError:
                raise
            except ProxyError as exc:
                self._log_error(event, exc, route.config.upstream)
                response = error_response(exc, head=event.method == b"HEAD")
                reason = exc.reason
            status = response.status
            sent = await self._respond(response, close=self.h11.their_state is not h11.DONE)
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
                self._record(event, started, status, sent, reason, route, request, aborted=not completed)

    def _record(
        self,
        event: h11.Request | None,
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
        now = trio.current_time()
        access_log.record(
            AccessRecord(
                time=time.time() - (now - started),
                listener=self.server.config.name,
                client_ip=self.peer_ip.decode("latin-1"),
                method=event.method.decode("latin-1") if event is not None else "-",
                target=redact_target(bytes(event.target)) if event is not None else "-",
                status=status,
                bytes_sent=sent,
                duration_s=now - started,
                route=(route.config.name or None) if route is not None else None,
                upstream=route.config.upstream if route is not None else None,
                outcome=request.outcome if request is not None else None,
                reason=reason,
                aborted=aborted,
                trace_id=request.outcome.trace_id if request is not None else None,
            )
        )

    def _reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def _respond(self, response: Response, *, close: bool) -> int:
        """Send a response, coalescing head, body chunks and end into as few writes as the
        body allows. An upstream failure after the head went out aborts the connection: the
        client must never mistake a truncated body for a complete one."""
        h = self.h11
        headers = response.headers
        sent = 0
        if close or self.server.draining or self.requests_served >= self.limits.max_requests_per_connection:
            headers = [*headers, (b"connection", b"close")]
        try:
            try:
                out = h.send(
                    h11.Response(status_code=response.status, headers=headers, reason=response.reason)
                )
                self.server.count_response(response.status)
                body = response.body
                if not body.ready():
                    await self.send(out)
                    out = b""
                async for chunk in body:
                    sent += len(chunk)
                    out += h.send(h11.Data(data=chunk))
                    if len(out) >= FLUSH_BYTES or not body.ready():
                        await self.send(out)
                        out = b""
                await self.send(out + h.send(h11.EndOfMessage()))
                return sent
            except ProxyError as exc:
                self._log_abort(exc.reason, exc.message)
                raise ClientGone(exc.reason) from None
            except h11.LocalProtocolError as exc:
                self._log_abort("response_aborted", str(exc))
                raise ClientGone("response_aborted") from None
        finally:
            response.release()

    def _log_abort(self, reason: str, message: str) -> None:
        # Throttled like every per-request warning: an upstream resetting mid-body at 1,000
        # req/s must not write 1,000 lines a second.
        suppressed = self.server.log_throttle.allow(("abort", reason), trio.current_time())
        if suppressed is not None:
            log.warning(
                "aborting response to client: %s%s",
                message,
                f" (+{suppressed} more like it)" if suppressed else "",
            )

    async def send(self, data: bytes) -> None:
        if not data:
            return
        # A bare CancelScope rather than fail_after: this runs for every write, and the
        # context-manager wrapper is measurable on the hot path.
        with trio.CancelScope(deadline=trio.current_time() + self.limits.send_timeout_s):
            try:
                await self.stream.send_all(data)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise ClientGone() from None
        log.info(
            "client %s stopped reading for %gs; closing", self.peer_ip.decode(), self.limits.send_timeout_s
        )
        raise ClientGone()

    async def _answer_and_close(self, error: ClientError) -> None:
        """Answer a bad request, unless a response is already under way, then close the way
        nginx's lingering close does."""
        suppressed = self.server.log_throttle.allow(("reject", error.reason), trio.current_time())
        if suppressed is not None:
            log.info(
                "rejecting request from %s: %d %s%s",
                self.peer_ip.decode(),
                error.status,
                error.message,
                f" (+{suppressed} more like it)" if suppressed else "",
            )
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = error.body()
        # Written by hand: h11 refuses to answer from IDLE, where our raw-head checks fail.
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

    def _log_error(self, event: h11.Request, exc: ProxyError, upstream: str | None = None) -> None:
        suppressed = self.server.log_throttle.allow((upstream, exc.reason), trio.current_time())
        if suppressed is None:
            return
        path = bytes(event.target).split(b"?", 1)[0][:200].decode("latin-1")
        log.warning(
            "%s %s -> %d %s (%s)%s%s",
            event.method.decode("latin-1"),
            path,
            exc.status,
            exc.reason,
            exc.message,
            f" upstream={upstream}" if upstream else "",
            f" (+{suppressed} more like it)" if suppressed else "",
        )
