"""Our error tree. Foreign exceptions (trio, ssl, OS) and framing errors are mapped to these at the `net`
boundary, so stages and the server only ever reason about these."""

from __future__ import annotations

import json


class ProxyError(Exception):
    """An error the daemon answers itself: a status, a stable machine-readable reason and a
    human message. The message never includes header values (they may be credentials)."""

    status = 502
    reason = "proxy_error"
    # Sent with the answer after the standard ones (e.g. RateLimit headers on a 429).
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(
        self, message: str, *, upstream: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.upstream = upstream
        self.retry_after_s = retry_after_s  # sent as Retry-After (whole seconds, rounded up)

    def body(self) -> bytes:
        doc: dict[str, str] = {"error": self.reason, "message": self.message}
        if self.upstream is not None:
            doc["upstream"] = self.upstream
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


class UpstreamError(ProxyError):
    """Anything that went wrong talking to the upstream (a candidate breaker failure)."""

    # Which `breaker.failure_errors` entry this is; None: never the upstream's fault.
    failure_kind: str | None = None


class UpstreamConnectError(UpstreamError):
    reason = "upstream_connect_failed"
    failure_kind = "connect"


class UpstreamDNSError(UpstreamConnectError):
    reason = "upstream_dns_failed"
    failure_kind = "dns"


class UpstreamTLSError(UpstreamConnectError):
    reason = "upstream_tls_failed"
    failure_kind = "tls"


class UpstreamTimeout(UpstreamError):
    status = 504
    reason = "upstream_timeout"
    failure_kind = "timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    reason = "upstream_connect_timeout"


class UpstreamProtocolError(UpstreamError):
    """The upstream broke HTTP/1.1 (garbage, bad framing, oversized head) or reset mid-way."""

    reason = "upstream_bad_response"
    failure_kind = "bad_response"


class UpstreamPoolTimeout(UpstreamError):
    status = 503
    reason = "upstream_pool_exhausted"


class StaleConnection(UpstreamError):
    """A pooled connection the peer had already closed; no response byte arrived, so an
    idempotent request may be replayed on a fresh connection."""

    reason = "upstream_connection_closed"


class DeadlineExceeded(UpstreamTimeout):
    """The route's overall deadline (retries and backoff included) ran out."""

    reason = "deadline_exceeded"


class BreakerOpen(ProxyError):
    """The upstream's circuit breaker is open (or half-open with its probes busy): answered at
    once without contacting the upstream. Never retried. A response cache in front may catch
    this and serve a stale copy instead: that is the hook for stale-if-error."""

    status = 503
    reason = "circuit_open"


class RateLimited(ProxyError):
    """A rate limit of ours said no (or the upstream's quota is spent and we hold its traffic):
    answered at once without contacting the upstream. Never retried: it is our own decision,
    and `retry_after_s` says when to come back."""

    status = 429
    reason = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        upstream: str | None = None,
        retry_after_s: float | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message, upstream=upstream, retry_after_s=retry_after_s)
        self.extra_headers = headers


class UpstreamQuotaExhausted(RateLimited):
    """The upstream said its quota is spent (429/503 with Retry-After, or Remaining 0): we hold
    its traffic until the reset instead of hammering it."""

    reason = "upstream_quota_exhausted"


class ClientError(ProxyError):
    """The downstream request is unacceptable; the connection is closed after the answer."""

    status = 400
    reason = "bad_request"

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class NoRoute(ProxyError):
    status = 404
    reason = "no_route"


class LoopDetected(ProxyError):
    """The request came back through an ambassador (Via): forwarding it again would loop."""

    status = 508
    reason = "loop_detected"
