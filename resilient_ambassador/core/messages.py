"""Request and response as they travel through the stages: heads plus a streamed body.

Header names are lower-case bytes (as core/http1.py parses them); values are bytes. Bodies are async
byte iterators so a 1 GiB response never sits in memory; a buffered body (`BufferedBody`) can
be replayed, which is what makes a retry possible.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, final

Headers = list[tuple[bytes, bytes]]


class Body(Protocol):
    """A message body: iterate it once (or more, if `replayable`)."""

    @property
    def length(self) -> int | None:
        """Content length when known in advance; None for chunked/unknown."""

    @property
    def replayable(self) -> bool:
        """True when the body can be iterated again (it was buffered)."""

    def ready(self) -> bool:
        """True when the next chunk (or the end) is available without waiting: lets the
        server coalesce head, body and end into one write instead of one per event."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...


@final
class BufferedBody:
    """A body held in memory: empty bodies, error bodies, bodies buffered for replay."""

    __slots__ = ("data",)

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    @property
    def length(self) -> int:
        return len(self.data)

    @property
    def replayable(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _BufferedIterator(self.data)


@final
class _BufferedIterator:
    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> _BufferedIterator:
        return self

    async def __anext__(self) -> bytes:
        data, self._data = self._data, b""
        if not data:
            raise StopAsyncIteration
        return data


EMPTY_BODY = BufferedBody()


@final
@dataclass(slots=True)
class Outcome:
    """What the stages decided for one downstream request. Stages write it; the access log,
    /stats and spans read it. One per downstream request: retries share it, so `attempts`
    counts every upstream attempt."""

    attempts: int = 0
    cache: str | None = None  # hit, miss, stale, revalidated, bypass, ... (Cache-Status terms)
    breaker: str | None = None  # "open" when the breaker refused the request
    rate_limit: str | None = None  # allowed, queued, rejected, quota_paused, ...
    rate_limit_wait_s: float = 0.0
    retries: int = 0
    trace_id: str | None = None  # set when the request is traced: the access log shows it


@final
@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes  # origin-form path + query, as forwarded (after prefix rewrite)
    headers: Headers
    body: Body = EMPTY_BODY
    http_version: bytes = b"1.1"
    # An attempt deadline (trio clock) set by the retry stage's per-try timeout; the upstream
    # client enforces it and raises UpstreamTimeout, so the breaker counts it.
    deadline: float = math.inf
    # The downstream peer address (the TCP peer, not X-Forwarded-For, which a client can
    # forge): what rate limits keyed by client use.
    client_ip: bytes = b""
    outcome: Outcome = field(default_factory=Outcome)
    # Set by the cache when a stale copy will answer if this request fails (stale-if-error):
    # the failure is then not retried, so the upstream is not asked again.
    stale_fallback: bool = False

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]


def _noop() -> None:
    return None


@final
@dataclass(slots=True)
class Response:
    """A response head and streamed body. `release()` must be called once the body is done
    with: it returns the upstream connection to the pool, or discards it if the body was not
    read to the end."""

    status: int
    headers: Headers
    body: Body = EMPTY_BODY
    reason: bytes = b""
    release: Callable[[], None] = field(default=_noop)


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case), or None."""
    for n, v in headers:
        if n == name:
            return v
    return None


class Handler(Protocol):
    """One stage shape for the whole pipeline, in the manner of httpcore's handle_async_request."""

    async def __call__(self, request: Request) -> Response: ...
