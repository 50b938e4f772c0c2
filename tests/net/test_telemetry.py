"""Traces and metrics end to end: the span tree, W3C propagation to the upstream, /metrics,
and a canary credential that must appear in none of them."""

from __future__ import annotations

import dataclasses
from typing import Any

import trio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from resilient_ambassador.core.config import (
    AccessLogConfig,
    BreakerConfig,
    RetryConfig,
    RouteCacheConfig,
    RouteConfig,
    TelemetryConfig,
)
from resilient_ambassador.core.templates import parse_template
from resilient_ambassador.secrets import SecretResolver
from resilient_ambassador.telemetry import DURATION_BUCKETS_S, Telemetry
from tests.support.canary import SecretScan
from tests.support.client import http_request
from tests.support.daemon import RunningDaemon, simple_config, start_daemon, upstream_config
from tests.support.otlp_collector import start_otlp_collector
from tests.support.upstream import FakeUpstream, Reply, start_fake_upstream

CANARY = "canary-otel-6c1d2e"
CLIENT_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def _traced(
    nursery: trio.Nursery, *, traced: bool = True, **upstream_fields: Any
) -> tuple[RunningDaemon, FakeUpstream, InMemorySpanExporter]:
    upstream = await start_fake_upstream(nursery)
    config = simple_config(
        upstream_config(
            upstream.url(), headers=(("X-Api-Key", parse_template("${API_KEY}")),), **upstream_fields
        ),
        retry=RetryConfig(retries=1),
    )
    config = dataclasses.replace(config, access_log=AccessLogConfig(enabled=False))
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(TelemetryConfig(), {}, span_exporter=exporter if traced else None)
    daemon = await start_daemon(nursery, config, SecretResolver({"API_KEY": CANARY}), telemetry)
    return daemon, upstream, exporter


def _by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


async def test_a_retried_request_is_one_server_span_with_a_client_span_per_attempt(
    nursery: trio.Nursery,
) -> None:
    daemon, upstream, exporter = await _traced(nursery)
    upstream.script(Reply(status=503), Reply(body=b"ok"))

    response = await http_request(
        daemon.port,
        "GET",
        f"/movies?api_key={CANARY}&page=2",
        headers=[
            ("traceparent", CLIENT_PARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("baggage", "tenant=a"),
        ],
    )
    spans = exporter.get_finished_spans()

    assert response.status == 200
    (server,) = _by_kind(spans, SpanKind.SERVER)
    first, second = _by_kind(spans, SpanKind.CLIENT)
    assert server.name == "GET /"
    assert server.parent is not None
    assert format(server.context.trace_id, "032x") == CLIENT_PARENT.split("-")[1]  # joined the app's trace
    for attempt in (first, second):
        assert attempt.parent is not None
        assert attempt.parent.span_id == server.context.span_id
    assert server.attributes is not None
    assert first.attributes is not None
    assert second.attributes is not None
    assert server.attributes["http.request.method"] == "GET"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["url.query"] == "api_key=REDACTED&page=2"
    assert (server.attributes["ambassador.attempts"], server.attributes["ambassador.retries"]) == (2, 1)
    assert first.attributes["http.response.status_code"] == 503
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["server.address"] == "127.0.0.1"
    # Each attempt carried its own CLIENT span as the upstream's parent, and the app's state.
    for received, attempt in zip(upstream.received, (first, second), strict=True):
        _, trace_id, parent_id, _ = (received.header("traceparent") or "").split("-")
        assert (trace_id, parent_id) == (CLIENT_PARENT.split("-")[1], format(attempt.context.span_id, "016x"))
        assert received.header("tracestate") == "congo=t61rcWkgMzE"
        assert received.header("baggage") == "tenant=a"
    assert SecretScan(CANARY).spans(spans) == 3


async def test_an_open_breaker_makes_no_attempt_span(nursery: trio.Nursery) -> None:
    breaker = BreakerConfig(failure_threshold=1, min_requests=0, reset_timeout_s=30.0)
    daemon, upstream, exporter = await _traced(nursery, breaker=breaker)
    upstream.default = Reply(status=503)

    await http_request(daemon.port, "POST", "/")
    exporter.clear()
    refused = await http_request(daemon.port, "GET", "/")
    spans = exporter.get_finished_spans()

    assert refused.status == 503
    assert [s.kind for s in spans] == [SpanKind.SERVER]
    attributes = spans[0].attributes
    assert attributes is not None
    assert attributes["ambassador.breaker.state"] == "open"
    assert attributes["error.type"] == "circuit_open"
    assert attributes["ambassador.attempts"] == 0
    assert spans[0].status.status_code is StatusCode.ERROR


async def test_a_malformed_traceparent_starts_a_new_trace_and_is_not_forwarded(nursery: trio.Nursery) -> None:
    daemon, upstream, exporter = await _traced(nursery)
    bad = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"

    await http_request(daemon.port, "GET", "/", headers=[("traceparent", bad), ("tracestate", "a=b")])
    (server,) = _by_kind(exporter.get_finished_spans(), SpanKind.SERVER)

    assert server.parent is None
    forwarded = upstream.received[0].header("traceparent") or ""
    assert forwarded.split("-")[1] == format(server.context.trace_id, "032x")
    assert upstream.received[0].header("tracestate") is None


async def test_without_tracing_valid_context_passes_through_and_bad_is_dropped(nursery: trio.Nursery) -> None:
    daemon, upstream, _ = await _traced(nursery, traced=False)
    oversized = "k=" + "v" * 9000

    await http_request(daemon.port, "GET", "/", headers=[("traceparent", CLIENT_PARENT), ("baggage", "a=b")])
    await http_request(daemon.port, "GET", "/", headers=[("traceparent", "garbage"), ("baggage", oversized)])

    assert upstream.received[0].header("traceparent") == CLIENT_PARENT
    assert upstream.received[0].header("baggage") == "a=b"
    assert upstream.received[1].header("traceparent") is None
    assert upstream.received[1].header("baggage") is None


async def test_metrics_are_prometheus_text_with_units_and_no_secret(nursery: trio.Nursery) -> None:
    daemon, upstream, _ = await _traced(nursery, traced=False)
    upstream.script(Reply(status=503), Reply(body=b"ok"))

    await http_request(daemon.port, "GET", f"/x?api_key={CANARY}")
    metrics = await http_request(daemon.admin_port, "GET", "/metrics")
    text = metrics.body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}

    assert metrics.status == 200
    assert (metrics.header("content-type") or "").startswith("text/plain; version=0.0.4")
    SecretScan(CANARY).absent("/metrics", text)
    duration = families["http_server_request_duration_seconds"]
    assert duration.type == "histogram"
    (count,) = [s for s in duration.samples if s.name.endswith("_count")]
    assert count.value == 1
    assert count.labels["http_response_status_code"] == "200"
    assert count.labels["http_response_status_class"] == "2xx"
    assert count.labels["ambassador_upstream"] == "up"
    attempts = [
        s for s in families["http_client_request_duration_seconds"].samples if s.name.endswith("_count")
    ]
    assert sorted((s.labels["http_response_status_code"], s.value) for s in attempts) == [
        ("200", 1),
        ("503", 1),
    ]
    retries = families["ambassador_retries"]
    assert [s.value for s in retries.samples if s.name == "ambassador_retries_total"] == [1]
    assert "ambassador_connections_open" in families
    assert "ambassador_listener_responses" in families


async def test_spans_and_metrics_reach_an_otlp_collector(nursery: trio.Nursery) -> None:
    collector = await start_otlp_collector(nursery)
    upstream = await start_fake_upstream(nursery)
    config = dataclasses.replace(
        simple_config(upstream_config(upstream.url())), access_log=AccessLogConfig(enabled=False)
    )
    telemetry = Telemetry(
        TelemetryConfig(traces_exporter="otlp", metrics_exporter="otlp", otlp_endpoint=collector.endpoint), {}
    )
    daemon = await start_daemon(nursery, config, telemetry=telemetry)

    await http_request(daemon.port, "GET", "/")
    await trio.to_thread.run_sync(telemetry.shutdown)  # flushes both exporters

    assert sorted(collector.span_names()) == ["GET", "GET /"]
    assert set(collector.content_types) == {b"application/x-protobuf"}
    names = {
        metric.name
        for export in collector.metrics
        for resource in export.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    assert {"http.server.request.duration", "http.client.request.duration"} <= names
    assert daemon.app.telemetry is telemetry


async def test_metrics_without_tracing_reach_an_otlp_collector(nursery: trio.Nursery) -> None:
    """Tracing off: the request metrics are aggregated in-process and join the SDK's export."""
    collector = await start_otlp_collector(nursery)
    upstream = await start_fake_upstream(nursery)
    config = dataclasses.replace(
        simple_config(upstream_config(upstream.url())), access_log=AccessLogConfig(enabled=False)
    )
    otlp = TelemetryConfig(
        metrics_exporter="otlp", otlp_endpoint=collector.endpoint, metrics_interval_s=3600.0
    )
    telemetry = Telemetry(otlp, {})  # one export: at shutdown
    daemon = await start_daemon(nursery, config, telemetry=telemetry)

    for _ in range(3):
        await http_request(daemon.port, "GET", "/")
    await trio.to_thread.run_sync(telemetry.shutdown)

    assert telemetry.aggregated
    assert collector.span_names() == []
    (export,) = collector.metrics
    (resource,) = export.resource_metrics
    (scope,) = resource.scope_metrics
    metrics = {metric.name: metric for metric in scope.metrics}
    (server,) = metrics["http.server.request.duration"].histogram.data_points
    (attempt,) = metrics["http.client.request.duration"].histogram.data_points
    assert (server.count, attempt.count) == (3, 3)
    assert sum(server.bucket_counts) == 3
    assert list(server.explicit_bounds) == list(DURATION_BUCKETS_S)
    assert {a.key: a.value.int_value for a in server.attributes if a.key.endswith("status_code")} == {
        "http.response.status_code": 200
    }
    assert "ambassador.listener.responses" in metrics  # the SDK's own, in the same scope


async def test_a_cache_hit_is_a_server_span_without_an_attempt(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(
        nursery, default=Reply(headers=(("cache-control", "max-age=60"),), body=b"cached")
    )
    route = RouteConfig(upstream="up", name="r", cache=RouteCacheConfig(enabled=True))
    config = dataclasses.replace(
        simple_config(upstream_config(upstream.url()), routes=[route]),
        access_log=AccessLogConfig(enabled=False),
    )
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(TelemetryConfig(), {}, span_exporter=exporter)
    daemon = await start_daemon(nursery, config, telemetry=telemetry)

    await http_request(daemon.port, "GET", "/movies")
    exporter.clear()
    hit = await http_request(daemon.port, "GET", "/movies")
    spans = exporter.get_finished_spans()

    assert (hit.status, hit.body) == (200, b"cached")
    assert len(upstream.received) == 1
    assert [s.kind for s in spans] == [SpanKind.SERVER]
    attributes = spans[0].attributes
    assert attributes is not None
    assert attributes["ambassador.cache.status"] == "hit"
    assert attributes["ambassador.attempts"] == 0
    metrics = await http_request(daemon.admin_port, "GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(metrics.body.decode())}
    events = {
        s.labels["ambassador_cache_event"]: s.value for s in families["ambassador_cache_events"].samples
    }
    assert events["stored"] == 1
    lookups = {
        s.labels["ambassador_cache_status"]: s.value for s in families["ambassador_cache_lookups"].samples
    }
    assert lookups["hit"] == 1
    assert families["ambassador_cache_store_size_bytes"].samples[0].value > 0
