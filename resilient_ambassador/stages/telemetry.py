"""Spans and request metrics around the pipeline: one SERVER span per downstream request
(outermost stage) and one CLIENT span per upstream attempt (innermost, just around the
upstream client, so an open breaker or a cache hit makes no attempt span).

Both spans end when the response head is known; the body then streams under its own
timeouts. The decisions of the other stages are read from `request.outcome` when the request
is answered and set as `ambassador.*` attributes, so no stage has to know about tracing.
W3C `traceparent`/`tracestate`/`baggage` from the app are checked (core.trace_context):
malformed ones are dropped and never forwarded; with tracing on, the proxy's CLIENT span
becomes the upstream's parent.

Metrics are recorded through `Record`s bound once per attribute set (per method and status,
say) and kept by the stage, so a request builds no attribute dict (telemetry.py).
"""

from __future__ import annotations

from typing import final

import trio
from opentelemetry import context, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.semconv.attributes import (
    client_attributes,
    error_attributes,
    http_attributes,
    network_attributes,
    server_attributes,
    url_attributes,
)
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from resilient_ambassador.core.access_log import redact_target
from resilient_ambassador.core.config import RouteConfig, UpstreamConfig
from resilient_ambassador.core.errors import ProxyError
from resilient_ambassador.core.messages import Handler, Headers, Request, Response
from resilient_ambassador.core.trace_context import TRACE_HEADERS, sanitize_trace_headers
from resilient_ambassador.telemetry import Record, Telemetry

PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"}
)
_METHOD_ATTRIBUTE = {m.encode(): m for m in KNOWN_METHODS}


def _method(request: Request) -> str:
    """`http.request.method`: the method, or `_OTHER` for one the conventions do not know."""
    return _METHOD_ATTRIBUTE.get(request.method, "_OTHER")


def _carrier(headers: Headers) -> dict[str, str]:
    return {n.decode("latin-1"): v.decode("latin-1") for n, v in headers if n in TRACE_HEADERS}


@final
class RequestTelemetry:
    """Outermost stage: the SERVER span and the request duration histogram."""

    def __init__(self, inner: Handler, telemetry: Telemetry, route: RouteConfig) -> None:
        self._inner = inner
        self._telemetry = telemetry
        self._tracer = telemetry.tracer
        self._route_name = route.name
        self._http_route = route.prefix
        self._upstream = route.upstream
        self._durations: dict[tuple[str, int], Record] = {}
        self._retries: Record | None = None
        self._cache_lookups: dict[str, Record] = {}
        self._rate_limit_decisions: dict[str, Record] = {}
        self._rate_limit_wait: Record | None = None

    async def __call__(self, request: Request) -> Response:
        headers, parent_ok = sanitize_trace_headers(request.headers)
        method = _method(request)
        started = trio.current_time()
        status = 0
        tracer = self._tracer
        if tracer is None:
            request.headers = headers
            try:
                response = await self._inner(request)
                status = response.status
                return response
            except ProxyError as exc:
                status = exc.status
                raise
            finally:
                self._record(request, method, status, trio.current_time() - started)
        # Ours replace the app's on the way out (the CLIENT span is the upstream's parent);
        # the app's valid ones only serve as our parent and as the baggage to pass on.
        parent = PROPAGATOR.extract(_carrier(headers)) if parent_ok else context.Context()
        if not parent_ok:  # baggage without a trace is still the app's to pass on
            parent = W3CBaggagePropagator().extract(_carrier(headers), context=parent)
        request.headers = [(n, v) for n, v in headers if n not in TRACE_HEADERS]
        error_type: str | None = None
        token = context.attach(parent)
        try:
            # No attributes at the start (our samplers do not read them): an unsampled span is
            # a cheap NonRecordingSpan, and the attributes are only built for recorded ones.
            with tracer.start_as_current_span(
                f"{method} {self._http_route}",
                kind=SpanKind.SERVER,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                span_context = span.get_span_context()
                if span_context.is_valid:
                    request.outcome.trace_id = format(span_context.trace_id, "032x")
                if span.is_recording():
                    span.set_attributes(self._attributes(request, method))
                try:
                    response = await self._inner(request)
                    status = response.status
                    return response
                except ProxyError as exc:
                    status = exc.status
                    error_type = exc.reason
                    raise
                finally:
                    if span.is_recording():
                        self._annotate(span, request, status, error_type)
                    self._record(request, method, status, trio.current_time() - started)
        finally:
            context.detach(token)

    def _attributes(self, request: Request, method: str) -> dict[str, str | int]:
        path, _, query = request.target.partition(b"?")
        attributes: dict[str, str | int] = {
            http_attributes.HTTP_REQUEST_METHOD: method,
            http_attributes.HTTP_ROUTE: self._http_route,
            url_attributes.URL_PATH: path.decode("latin-1"),
            url_attributes.URL_SCHEME: "http",
            network_attributes.NETWORK_PROTOCOL_VERSION: request.http_version.decode("latin-1"),
            client_attributes.CLIENT_ADDRESS: request.client_ip.decode("latin-1"),
            "ambassador.route": self._route_name,
            "ambassador.upstream": self._upstream,
        }
        if query:
            attributes[url_attributes.URL_QUERY] = redact_target(b"?" + query)[1:]
        return attributes

    def _annotate(self, span: trace.Span, request: Request, status: int, error_type: str | None) -> None:
        outcome = request.outcome
        if status:
            span.set_attribute(http_attributes.HTTP_RESPONSE_STATUS_CODE, status)
        if status >= 500:
            # Semantic conventions: a 5xx is an error on a SERVER span; a 4xx is the client's.
            span.set_status(StatusCode.ERROR)
            span.set_attribute(error_attributes.ERROR_TYPE, error_type or str(status))
        span.set_attribute("ambassador.attempts", outcome.attempts)
        if outcome.retries:
            span.set_attribute("ambassador.retries", outcome.retries)
        if outcome.cache is not None:
            span.set_attribute("ambassador.cache.status", outcome.cache)
            span.set_attribute("ambassador.cache.stale_served", outcome.cache.startswith("stale"))
        if outcome.breaker is not None:
            span.set_attribute("ambassador.breaker.state", outcome.breaker)
        if outcome.rate_limit is not None:
            span.set_attribute("ambassador.rate_limit.outcome", outcome.rate_limit)
            span.set_attribute("ambassador.rate_limit.wait_s", outcome.rate_limit_wait_s)

    def _record(self, request: Request, method: str, status: int, elapsed_s: float) -> None:
        record = self._durations.get((method, status))
        if record is None:
            record = self._durations[method, status] = self._telemetry.server_duration.bind(
                {
                    http_attributes.HTTP_REQUEST_METHOD: method,
                    http_attributes.HTTP_RESPONSE_STATUS_CODE: status,
                    "http.response.status_class": f"{status // 100}xx",
                    http_attributes.HTTP_ROUTE: self._http_route,
                    "ambassador.route": self._route_name,
                    "ambassador.upstream": self._upstream,
                }
            )
        record(elapsed_s)
        outcome = request.outcome
        if outcome.retries:
            if self._retries is None:
                self._retries = self._telemetry.retries.bind(
                    {"ambassador.route": self._route_name, "ambassador.upstream": self._upstream}
                )
            self._retries(outcome.retries)
        if outcome.cache is not None:
            lookup = self._cache_lookups.get(outcome.cache)
            if lookup is None:
                lookup = self._cache_lookups[outcome.cache] = self._telemetry.cache_lookups.bind(
                    {"ambassador.route": self._route_name, "ambassador.cache.status": outcome.cache}
                )
            lookup(1)
        if outcome.rate_limit is not None:
            decision = self._rate_limit_decisions.get(outcome.rate_limit)
            if decision is None:
                decision = self._rate_limit_decisions[outcome.rate_limit] = (
                    self._telemetry.rate_limit_decisions.bind(
                        {
                            "ambassador.route": self._route_name,
                            "ambassador.rate_limit.outcome": outcome.rate_limit,
                        }
                    )
                )
            decision(1)
            if outcome.rate_limit_wait_s:
                if self._rate_limit_wait is None:
                    self._rate_limit_wait = self._telemetry.rate_limit_wait.bind(
                        {"ambassador.route": self._route_name}
                    )
                self._rate_limit_wait(outcome.rate_limit_wait_s)


@final
class AttemptTelemetry:
    """Innermost stage: one CLIENT span per upstream attempt, whose context is what the
    upstream receives as `traceparent`, and the attempt duration histogram."""

    def __init__(self, inner: Handler, telemetry: Telemetry, upstream: UpstreamConfig) -> None:
        self._inner = inner
        self._telemetry = telemetry
        self._tracer = telemetry.tracer
        self._upstream = upstream.name
        url = upstream.url
        self._origin = f"{'https' if url.uses_tls else 'http'}://{url.authority}{url.base_path}"
        self._address = url.host
        self._port = url.port
        self._durations: dict[tuple[str, str | int], Record] = {}

    async def __call__(self, request: Request) -> Response:
        method = _method(request)
        started = trio.current_time()
        resends = request.outcome.attempts  # attempts before this one
        outcome: str | int = "cancelled"
        tracer = self._tracer
        try:
            if tracer is None:
                response = await self._inner(request)
                outcome = response.status
                return response
            with tracer.start_as_current_span(
                method,
                kind=SpanKind.CLIENT,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                recording = span.is_recording()
                if recording:
                    attributes: dict[str, str | int] = {
                        http_attributes.HTTP_REQUEST_METHOD: method,
                        server_attributes.SERVER_ADDRESS: self._address,
                        server_attributes.SERVER_PORT: self._port,
                        url_attributes.URL_FULL: self._origin + redact_target(request.target),
                        "ambassador.upstream": self._upstream,
                    }
                    if resends:
                        attributes[http_attributes.HTTP_REQUEST_RESEND_COUNT] = resends
                    span.set_attributes(attributes)
                carrier: dict[str, str] = {}
                PROPAGATOR.inject(carrier)
                headers = [(n, v) for n, v in request.headers if n not in TRACE_HEADERS]
                headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items())
                try:
                    response = await self._inner(request.replace(headers=headers))
                except ProxyError as exc:
                    outcome = exc.reason
                    if recording:
                        span.set_attribute(error_attributes.ERROR_TYPE, exc.reason)
                        span.set_status(StatusCode.ERROR, exc.message)
                    raise
                outcome = response.status
                if not recording:
                    return response
                span.set_attribute(http_attributes.HTTP_RESPONSE_STATUS_CODE, response.status)
                if response.status >= 500:
                    span.set_status(StatusCode.ERROR)
                    span.set_attribute(error_attributes.ERROR_TYPE, str(response.status))
                return response
        except ProxyError as exc:
            outcome = exc.reason
            raise
        finally:
            record = self._durations.get((method, outcome))
            if record is None:
                record = self._durations[method, outcome] = self._bind(method, outcome)
            record(trio.current_time() - started)

    def _bind(self, method: str, outcome: str | int) -> Record:
        attributes: dict[str, str | int] = {
            http_attributes.HTTP_REQUEST_METHOD: method,
            server_attributes.SERVER_ADDRESS: self._address,
            server_attributes.SERVER_PORT: self._port,
            "ambassador.upstream": self._upstream,
        }
        if isinstance(outcome, int):
            attributes[http_attributes.HTTP_RESPONSE_STATUS_CODE] = outcome
        else:
            attributes[error_attributes.ERROR_TYPE] = outcome
        return self._telemetry.client_duration.bind(attributes)
