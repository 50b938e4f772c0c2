"""The retry stage: replays a failed idempotent request within the route's deadline, with
full-jitter backoff, honouring upstream Retry-After, bounded by a retry budget.

A retry is only ever safe before any response byte has gone to the client. That holds by
construction: this stage decides on the response head, before it returns the response; a body
that fails later (in the server's write loop) is never retried. The rules and maths live in
`core.retry`; this file does the waiting, the body buffering and the deadline.
"""

from __future__ import annotations

import logging
import math
import random as _random
import time
from collections.abc import AsyncIterator, Callable
from typing import final

import trio

from resilient_ambassador.core.config import RetryConfig
from resilient_ambassador.core.errors import DeadlineExceeded, ProxyError, UpstreamTimeout
from resilient_ambassador.core.messages import Body, BufferedBody, Handler, Request, Response, header_value
from resilient_ambassador.core.retry import (
    RETRY_AFTER_STATUSES,
    RetryBudget,
    RetryState,
    error_retry_reason,
    parse_retry_after,
    status_retry_reason,
)
from resilient_ambassador.core.units import parse_duration

log = logging.getLogger("resilient_ambassador.retry")


# Well past the per-try deadline, so a busy event loop cannot let the backstop fire first.
PER_TRY_BACKSTOP_S = 0.1


@final
class RetryStage:
    """Retries a request on upstream failure, only when it is safe and affordable.

    Safe: the method is in `config.methods` (idempotent ones by default, RFC 9110 9.2.2) and
    the request body could be buffered (`buffer_body_bytes`); a larger body is streamed once.
    Affordable: attempts stay within `config.retries`, the overall deadline and the route's
    shared `budget`.

    The deadline is `route_timeout_s`, shortened (never lengthened) by the client's
    `deadline_header`; it starts once the request body is buffered (Envoy's route timeout
    starts at the end of the downstream request, so a slow upload is the client's body timeout,
    not a 504). It bounds getting a response head, retries and backoff included; the body then
    streams under the upstream's read timeouts.
    """

    def __init__(
        self,
        inner: Handler,
        config: RetryConfig,
        *,
        route_timeout_s: float | None,
        deadline_header: bytes | None,
        budget: RetryBudget,
        random: Callable[[], float] = _random.random,
        upstream: str | None = None,
    ) -> None:
        self._inner = inner
        self._config = config
        self._route_timeout_s = route_timeout_s
        self._deadline_header = deadline_header.lower() if deadline_header else None
        self._budget = budget
        self._random = random
        self._upstream = upstream  # named in the errors this stage raises itself
        # Methods are case-sensitive (RFC 9110 9.1): `get` is not GET.
        self._methods = frozenset(m.encode("ascii") for m in config.methods)

    async def __call__(self, request: Request) -> Response:
        config = self._config
        self._budget.record_request(trio.current_time())
        request, timeout_s = self._take_deadline(request)
        max_retries = 0
        # With a stale copy to fall back on (the cache's stale-if-error), a failure is answered
        # from the cache at once instead of asking the upstream again.
        if config.retries > 0 and request.method in self._methods and not request.stale_fallback:
            body, replayable = await buffer_body(request.body, config.buffer_body_bytes)
            if body is not request.body:
                request = request.replace(body=body)
            if replayable:
                max_retries = config.retries
        start = trio.current_time()
        state = RetryState(max_retries, math.inf if timeout_s is None else start + timeout_s)
        # The per-try timeout exists to leave time for a retry; a request that cannot be
        # retried gets the whole deadline.
        per_try_s = config.per_try_timeout_s if max_retries else None
        while True:
            try:
                response = await self._attempt(request, state, per_try_s, start)
            except ProxyError as exc:
                reason = error_retry_reason(exc)
                delay_s = None if reason is None else self._plan(request, state, reason, None)
                if reason is None or delay_s is None:
                    raise
            else:
                retry_after_s = self._retry_after_s(response)
                reason = status_retry_reason(response.status, config.on_statuses, retry_after_s)
                delay_s = None if reason is None else self._plan(request, state, reason, retry_after_s)
                if reason is None or delay_s is None:
                    return response  # success, or the upstream's failure passed through as is
                response.release()  # dropped: hand its connection back (or discard it)
            self._budget.record_retry(trio.current_time())
            state = state.increment(reason)
            await trio.sleep(delay_s)

    def _plan(
        self, request: Request, state: RetryState, reason: str, retry_after_s: float | None
    ) -> float | None:
        """The wait before retrying a retryable failure, or None to give up (logged either way)."""
        now = trio.current_time()
        decision = state.decide(
            now=now,
            draw=self._random(),
            base_s=self._config.backoff_base_s,
            max_s=self._config.backoff_max_s,
            retry_after_s=retry_after_s,
        )
        why = decision.why
        if decision.retry and not self._budget.can_retry(now):
            why = "budget_exhausted"
        if why:
            if state.max_retries:
                log.debug(
                    "not retrying %s %s after attempt %d (%s): %s",
                    request.method.decode("latin-1"),
                    _path(request),
                    state.attempt,
                    reason,
                    why,
                )
            # Telemetry hook: count `retries_given_up{why}` here.
            return None
        log.debug(
            "retrying %s %s: attempt %d failed (%s), attempt %d in %.3fs",
            request.method.decode("latin-1"),
            _path(request),
            state.attempt,
            reason,
            state.attempt + 1,
            decision.delay_s,
        )
        # Telemetry hook: count `retries{reason}` and add a span event (attempt, reason, delay).
        request.outcome.retries += 1
        return decision.delay_s

    async def _attempt(
        self, request: Request, state: RetryState, per_try_s: float | None, start: float
    ) -> Response:
        """One call to the inner handler under the per-try and overall deadlines."""
        deadline = state.deadline
        if per_try_s is not None and (per_try_deadline := trio.current_time() + per_try_s) < deadline:
            # The upstream client enforces this itself and raises UpstreamTimeout inside the
            # breaker, so a per-try timeout counts as the upstream's failure. The scope below
            # is only a backstop, later, because if both had expired the outer scope
            # would catch the cancellation first and the breaker would never see a timeout.
            deadline = min(deadline, per_try_deadline + PER_TRY_BACKSTOP_S)
            request = request.replace(deadline=per_try_deadline)
        if deadline == math.inf:
            return await self._inner(request)  # no deadline: a cancel scope would never fire
        with trio.CancelScope(deadline=deadline):
            return await self._inner(request)
        if deadline < state.deadline:
            raise UpstreamTimeout(
                f"no response within the {per_try_s:g}s per-try timeout (attempt {state.attempt})",
                upstream=self._upstream,
            )
        raise DeadlineExceeded(
            f"no response within the {state.deadline - start:g}s deadline "
            f"({state.attempt} attempt{'s' if state.attempt > 1 else ''})",
            upstream=self._upstream,
        )

    def _take_deadline(self, request: Request) -> tuple[Request, float | None]:
        """The request without the deadline header, and the effective timeout: the route's,
        shortened (never lengthened) by the smallest valid value the client sent."""
        timeout_s = self._route_timeout_s
        name = self._deadline_header
        if name is None or not any(n == name for n, _ in request.headers):
            return request, timeout_s
        kept = []
        for n, value in request.headers:
            if n != name:
                kept.append((n, value))
                continue
            try:
                asked_s = parse_duration(value.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                continue  # an unreadable deadline is ignored, not an error
            timeout_s = asked_s if timeout_s is None else min(timeout_s, asked_s)
        return request.replace(headers=kept), timeout_s

    def _retry_after_s(self, response: Response) -> float | None:
        if not self._config.respect_retry_after or response.status not in RETRY_AFTER_STATUSES:
            return None
        value = header_value(response.headers, b"retry-after")
        if value is None:
            return None
        # An HTTP-date is wall-clock time; everything else here runs on trio's clock.
        return parse_retry_after(value, time.time())


def _path(request: Request) -> str:
    """The path for a log line: no query (it may carry a token), bounded in length."""
    return request.path[:200].decode("latin-1")


async def buffer_body(body: Body, limit_bytes: int) -> tuple[Body, bool]:
    """A body to send, and whether it can be replayed.

    A replayable body is used as is. One of known length up to `limit_bytes` is read into a
    `BufferedBody`; a longer one is left to stream. One of unknown length (chunked) is read
    until it ends (buffered) or passes the limit: then the bytes already read go out first,
    followed by the rest, and the request is not retried. Errors reading the client's body
    (a `ClientError`, a timeout) propagate as they are.
    """
    if body.replayable:
        return body, True
    if body.length is not None and body.length > limit_bytes:
        return body, False
    chunks: list[bytes] = []
    size = 0
    rest = aiter(body)
    async for chunk in rest:
        chunks.append(chunk)
        size += len(chunk)
        if size > limit_bytes:
            return PrefixedBody(b"".join(chunks), body, rest), False
    return BufferedBody(b"".join(chunks)), True


@final
class PrefixedBody:
    """A streamed body whose start was already read while trying to buffer it: yields that
    prefix, then the rest from the original body. Not replayable."""

    __slots__ = ("_body", "_prefix", "_rest")

    def __init__(self, prefix: bytes, body: Body, rest: AsyncIterator[bytes]) -> None:
        self._prefix = prefix
        self._body = body
        self._rest = rest

    @property
    def length(self) -> int | None:
        return self._body.length

    @property
    def replayable(self) -> bool:
        return False

    def ready(self) -> bool:
        return bool(self._prefix) or self._body.ready()

    def __aiter__(self) -> PrefixedBody:
        return self

    async def __anext__(self) -> bytes:
        if self._prefix:
            prefix, self._prefix = self._prefix, b""
            return prefix
        return await anext(self._rest)
