"""The admin listener: a small HTTP/1.1 server (on core/http1.py) for /healthz, /readyz, /stats,
/config, /metrics and the cache purge (`POST /cache/purge?url=/path` or `?prefix=/path/`, or the
same as a JSON body).

It never forwards anything: every answer is built from the callbacks the app hands it. It is
deliberately stingy, since it shares the process with the data path: one request per
connection (`Connection: close`), a small head limit, one short deadline for the whole
exchange, GET and HEAD only (POST for the purge), and a cap on concurrent connections.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Literal, final
from urllib.parse import parse_qsl

import trio

from resilient_ambassador.core.errors import ClientError
from resilient_ambassador.core.http1 import (
    HEAD_END,
    ChunkedDecoder,
    FramingError,
    RequestHead,
    parse_request_head,
    response_head_bytes,
)
from resilient_ambassador.core.messages import Headers
from resilient_ambassador.net.server import error_headers, linger_close

log = logging.getLogger("resilient_ambassador.admin")

# Admin requests are a path and a few headers; 8 KiB leaves nothing for a slowloris to fill.
ADMIN_HEAD_BYTES = 8 * 1024
# The whole exchange (read the head, answer, close) must fit in this: probes and scrapers
# answer in milliseconds, and a stuck client must not hold a slot.
ADMIN_TIMEOUT_S = 5.0
MAX_ADMIN_CONNECTIONS = 64
RECEIVE_BYTES = 16 * 1024
LINGER_S = 0.5
LINGER_BYTES = 64 * 1024

Readiness = Literal["starting", "ready", "draining"]
Document = Callable[[], Mapping[str, object]]
# (target, is_prefix) -> (status, document)
Purge = Callable[[bytes, bool], Awaitable[tuple[int, Mapping[str, object]]]]
PURGE_PATH = b"/cache/purge"
MAX_PURGE_BODY_BYTES = 8 * 1024


# The Prometheus text exposition format, version 0.0.4 (what prometheus_client writes).
PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"


@final
class AdminServer:
    """Answers admin requests from three callbacks: readiness, the stats document and the
    (already redacted) config document."""

    def __init__(
        self,
        *,
        readiness: Callable[[], Readiness],
        stats: Document,
        config: Document,
        metrics: Callable[[], bytes] | None = None,
        purge: Purge | None = None,
    ) -> None:
        self._readiness = readiness
        self._stats = stats
        self._config = config
        self._metrics = metrics
        self._purge = purge
        self.open_connections = 0

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        if self.open_connections >= MAX_ADMIN_CONNECTIONS:
            stream.socket.close()
            return
        self.open_connections += 1
        try:
            with trio.move_on_after(ADMIN_TIMEOUT_S):
                await self._exchange(stream)
        finally:
            self.open_connections -= 1
            stream.socket.close()

    def answer(self, method: bytes, target: bytes) -> tuple[int, Headers, bytes]:
        """Status, headers and body for one request (the body even for HEAD: not sent then)."""
        if method not in (b"GET", b"HEAD"):
            status, headers, body = _error(405, "method_not_allowed", "the admin API is read-only")
            return status, [*headers, (b"allow", b"GET, HEAD")], body
        path = target.split(b"?", 1)[0]
        if path == b"/healthz":
            return _text(200, "ok")
        if path == b"/readyz":
            state = self._readiness()
            return _text(200 if state == "ready" else 503, state)
        if path == b"/stats":
            return _json(self._stats())
        if path == b"/config":
            return _json(self._config())
        if path == b"/metrics" and self._metrics is not None:
            body = self._metrics()
            return 200, _common(PROMETHEUS_TEXT, body), body
        return _error(
            404, "not_found", "unknown admin path (try /healthz, /readyz, /stats, /config, /metrics)"
        )

    async def _exchange(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        try:
            request = await _read_request(stream, buffer)
        except FramingError as exc:
            status, headers, body = _error(exc.status, "bad_request", exc.message)
            await _answer(stream, status, headers, body)
            return
        if request is None:
            return
        if request.method == b"POST" and request.target.split(b"?", 1)[0] == PURGE_PATH:
            status, headers, body = await self._purge_answer(stream, buffer, request)
        else:
            status, headers, body = self.answer(request.method, request.target)
        await _answer(stream, status, headers, b"" if request.method == b"HEAD" else body)

    async def _purge_answer(
        self, stream: trio.SocketStream, buffer: bytearray, request: RequestHead
    ) -> tuple[int, Headers, bytes]:
        if self._purge is None:
            return _error(404, "not_found", "the cache is off")
        _, _, query = request.target.partition(b"?")
        params: dict[str, object] = dict(parse_qsl(query.decode("latin-1")))
        body = await _read_body(stream, buffer, request)
        if body is None:
            return _error(413, "body_too_large", "purge requests are small JSON documents")
        if body.strip():
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                return _error(400, "bad_request", 'expected a JSON object like {"prefix": "/v1/"}')
            params.update(doc)
        url, prefix = params.get("url"), params.get("prefix")
        value = url if prefix is None else prefix
        if (url is None) == (prefix is None) or not isinstance(value, str) or not value.startswith("/"):
            return _error(400, "bad_request", "give exactly one of url or prefix, a path starting with /")
        try:
            target = value.encode("latin-1")
        except UnicodeEncodeError:
            return _error(400, "bad_request", "the path must be percent-encoded")
        status, doc = await self._purge(target, prefix is not None)
        out = _json(doc)
        return status, out[1], out[2]


async def _answer(stream: trio.SocketStream, status: int, headers: Headers, body: bytes) -> None:
    """One response, then close the way nginx's lingering close does."""
    head = response_head_bytes(
        status, HTTPStatus(status).phrase.encode(), [*headers, (b"connection", b"close")]
    )
    await _send(stream, head + body)
    await linger_close(stream, LINGER_S, LINGER_BYTES)


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return bytes(await stream.receive_some(RECEIVE_BYTES))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return b""


async def _read_body(stream: trio.SocketStream, buffer: bytearray, request: RequestHead) -> bytes | None:
    """A small request body (None when over the limit, malformed, or the client went away)."""
    if request.chunked:
        decoder = ChunkedDecoder()
        body = bytearray()
        while True:
            try:
                body += decoder.decode(buffer)
            except FramingError:
                return None
            if decoder.done:
                return bytes(body)
            if len(body) + decoder.declared_left > MAX_PURGE_BODY_BYTES:
                return None
            data = await _receive(stream)
            if not data:
                return None
            buffer += data
    length = request.content_length or 0
    if length > MAX_PURGE_BODY_BYTES:
        return None
    while len(buffer) < length:
        data = await _receive(stream)
        if not data:
            return None
        buffer += data
    return bytes(buffer[:length])


async def _read_request(stream: trio.SocketStream, buffer: bytearray) -> RequestHead | None:
    """The request head (None: the client closed, possibly after half a head). Raises
    FramingError, 431 when the head outgrows ADMIN_HEAD_BYTES."""
    while True:
        end = buffer.find(HEAD_END)
        if end != -1:
            head = bytes(buffer[: end + 4])
            del buffer[: end + 4]
            return parse_request_head(head)
        if len(buffer) > ADMIN_HEAD_BYTES:
            raise FramingError("request head too large", 431)
        data = await _receive(stream)
        if not data:
            return None
        buffer += data


async def _send(stream: trio.SocketStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


def _common(content_type: bytes, body: bytes) -> Headers:
    return [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]


def _text(status: int, text: str) -> tuple[int, Headers, bytes]:
    body = text.encode() + b"\n"
    return status, _common(b"text/plain; charset=utf-8", body), body


def _json(doc: Mapping[str, object]) -> tuple[int, Headers, bytes]:
    body = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    return 200, _common(b"application/json", body), body


def _error(status: int, reason: str, message: str) -> tuple[int, Headers, bytes]:
    error = ClientError(status, reason, message)
    body = error.body()
    return status, error_headers(error, body), body
