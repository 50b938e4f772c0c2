"""The pre-aggregated request metrics (tracing off) against the SDK's own instruments (tracing
on): the same records must export the same metrics, on /metrics and over OTLP, cumulative or
delta, and across collections."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from prometheus_client.parser import text_string_to_metric_families

from resilient_ambassador.core.config import TelemetryConfig
from resilient_ambassador.telemetry import CARDINALITY_LIMIT, SCOPE, Attributes, Telemetry
from tests.support.otlp_collector import OtlpCollector, start_otlp_collector

SERVER_OK: Attributes = {
    "http.request.method": "GET",
    "http.response.status_code": 200,
    "http.response.status_class": "2xx",
    "http.route": "/",
    "ambassador.route": "r",
    "ambassador.upstream": "up",
}
SERVER_ERROR: Attributes = {
    **SERVER_OK,
    "http.response.status_code": 503,
    "http.response.status_class": "5xx",
}
ATTEMPT_TIMEOUT: Attributes = {
    "http.request.method": "GET",
    "server.address": "127.0.0.1",
    "server.port": 8080,
    "ambassador.upstream": "up",
    "error.type": "upstream_timeout",
}
ROUTE: Attributes = {"ambassador.route": "r", "ambassador.upstream": "up"}

# Dyadic values, so sums are exact whatever the order of additions; 0.25 and 1.0 sit on
# bucket boundaries (a boundary value counts in its own `le` bucket).
FIRST = [0.0078125, 0.25, 0.25, 3.0, 12.0]
SECOND = [0.5, 1.0]


def _pair(**config: Any) -> tuple[Telemetry, Telemetry]:
    """(ours, the SDK's own instruments as the reference)."""
    ours = Telemetry(TelemetryConfig(**config), {})
    sdk = Telemetry(TelemetryConfig(**config), {}, sdk_instruments=True)
    assert (ours.aggregated, sdk.aggregated) == (True, False)
    return ours, sdk


def _record(telemetry: Telemetry, server: list[float], errors: int) -> None:
    ok = telemetry.server_duration.bind(SERVER_OK)
    for value in server:
        ok(value)
    for _ in range(errors):
        telemetry.server_duration.bind(SERVER_ERROR)(0.0625)
        telemetry.client_duration.bind(ATTEMPT_TIMEOUT)(2.0)
        telemetry.retries.bind(ROUTE)(1)
    telemetry.cache_lookups.bind({"ambassador.route": "r", "ambassador.cache.status": "miss"})(len(server))
    telemetry.rate_limit_wait.bind({"ambassador.route": "r"})(0.125)


def _samples(telemetry: Telemetry) -> set[tuple[str, frozenset[tuple[str, str]], float]]:
    text = telemetry.prometheus_text().decode()
    return {
        (sample.name, frozenset(sample.labels.items()), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_text_is_the_sdk_s_across_two_scrapes() -> None:
    ours, sdk = _pair()
    for telemetry in (ours, sdk):
        _record(telemetry, FIRST, errors=2)
    first = _samples(ours)
    assert first == _samples(sdk)
    for telemetry in (ours, sdk):
        _record(telemetry, SECOND, errors=1)
    second = _samples(ours)
    assert second == _samples(sdk)
    assert second != first
    assert "anchor" not in ours.prometheus_text().decode()


def test_values_the_sdk_drops_are_dropped() -> None:
    ours, sdk = _pair()
    for telemetry in (ours, sdk):
        record = telemetry.server_duration.bind(SERVER_OK)
        for value in (0.5, -1.0, math.inf, math.nan):
            record(value)
        telemetry.retries.bind(ROUTE)(-1)
        telemetry.retries.bind(ROUTE)(2)
    samples = _samples(ours)
    assert samples == _samples(sdk)
    assert _value(samples, "http_server_request_duration_seconds_count") == 1
    assert _value(samples, "ambassador_retries_total") == 2


def _bucket(samples: set[tuple[str, frozenset[tuple[str, str]], float]], le: str, status: str) -> float:
    (value,) = [
        v
        for name, labels, v in samples
        if name == "http_server_request_duration_seconds_bucket"
        and ("le", le) in labels
        and ("http_response_status_code", status) in labels
    ]
    return value


def _value(samples: set[tuple[str, frozenset[tuple[str, str]], float]], name: str, **labels: str) -> float:
    (value,) = [v for n, ls, v in samples if n == name and set(labels.items()) <= ls]
    return value


def test_metrics_text_values_are_pinned_and_cumulative() -> None:
    ours, _ = _pair()
    _record(ours, FIRST, errors=2)
    first = _samples(ours)
    _record(ours, SECOND, errors=1)
    second = _samples(ours)

    count = "http_server_request_duration_seconds_count"
    total = "http_server_request_duration_seconds_sum"
    ok = {"http_response_status_code": "200"}
    assert (_value(first, count, **ok), _value(first, total, **ok)) == (5, 15.5078125)
    assert [
        _bucket(first, le, "200") for le in ("0.005", "0.01", "0.25", "0.5", "1.0", "2.5", "5.0", "+Inf")
    ] == [
        0,
        1,
        3,
        3,
        3,
        3,
        4,
        5,
    ]
    assert (_value(second, count, **ok), _value(second, total, **ok)) == (7, 17.0078125)
    assert [_bucket(second, le, "200") for le in ("0.25", "0.5", "1.0", "+Inf")] == [3, 4, 5, 7]
    assert _value(second, count, http_response_status_code="503") == 3
    assert _value(second, "http_client_request_duration_seconds_count", error_type="upstream_timeout") == 3
    assert _value(second, "http_client_request_duration_seconds_sum") == 6.0
    assert _value(second, "ambassador_retries_total") == 3
    assert _value(second, "ambassador_cache_lookups_total", ambassador_cache_status="miss") == 7
    assert _value(second, "ambassador_rate_limit_queue_wait_seconds_count") == 2


def test_attribute_sets_past_the_cardinality_limit_overflow_as_in_the_sdk() -> None:
    ours, sdk = _pair()
    for telemetry in (ours, sdk):
        for n in range(CARDINALITY_LIMIT + 5):
            telemetry.cache_lookups.bind({"ambassador.route": "r", "ambassador.cache.status": f"s{n}"})(1)
    samples = _samples(ours)
    assert samples == _samples(sdk)
    assert _value(samples, "ambassador_cache_lookups_total", otel_metric_overflow="true") == 5


def _point(point: Any) -> dict[str, Any]:
    """A data point's fields, without its timestamps."""
    fields = {field.name: value for field, value in point.ListFields()}
    fields.pop("start_time_unix_nano", None)
    fields.pop("time_unix_nano", None)
    fields["attributes"] = sorted((a.key, a.value.SerializeToString()) for a in point.attributes)
    for name in ("bucket_counts", "explicit_bounds", "exemplars"):
        if name in fields:
            fields[name] = list(fields[name])
    return fields


def _exported(collector: OtlpCollector) -> Iterator[dict[str, dict[str, Any]]]:
    """Per export, our scope's metrics by name, without timestamps; no anchor anywhere."""
    for export in collector.metrics:
        scopes = [s for r in export.resource_metrics for s in r.scope_metrics]
        assert [s.scope.name for s in scopes] == [SCOPE]  # ours joined the SDK's; no anchor
        metrics: dict[str, dict[str, Any]] = {}
        for metric in (m for s in scopes for m in s.metrics):
            kind = metric.WhichOneof("data")
            data = getattr(metric, kind)
            metrics[metric.name] = {
                "unit": metric.unit,
                "description": metric.description,
                "kind": kind,
                "temporality": getattr(data, "aggregation_temporality", None),
                "monotonic": getattr(data, "is_monotonic", None),
                "points": sorted((_point(p) for p in data.data_points), key=repr),
            }
        yield metrics


@pytest.mark.parametrize("temporality", ["cumulative", "delta", "lowmemory"])
async def test_otlp_exports_are_the_sdk_s(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, temporality: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", temporality)
    collectors = [await start_otlp_collector(nursery), await start_otlp_collector(nursery)]
    ours, sdk = (
        Telemetry(
            TelemetryConfig(metrics_exporter="otlp", otlp_endpoint=c.endpoint, metrics_interval_s=3600.0),
            {},
            sdk_instruments=sdk,
        )
        for c, sdk in zip(collectors, (False, True), strict=True)
    )
    assert (ours.aggregated, sdk.aggregated) == (True, False)
    for telemetry in (ours, sdk):
        _record(telemetry, FIRST, errors=2)
        # A collection between the two batches: delta points then hold the second batch only.
        await trio.to_thread.run_sync(telemetry._meter_provider.force_flush)
        _record(telemetry, SECOND, errors=0)
        await trio.to_thread.run_sync(telemetry.shutdown)

    ours_exports, sdk_exports = (list(_exported(c)) for c in collectors)
    assert len(ours_exports) == 2
    assert ours_exports == sdk_exports
    second = ours_exports[1]
    status_200 = ("http.response.status_code", AnyValue(int_value=200).SerializeToString())
    (ok,) = [p for p in second["http.server.request.duration"]["points"] if status_200 in p["attributes"]]
    if temporality == "cumulative":
        assert (ok["count"], ok["sum"], ok["min"], ok["max"]) == (7, 17.0078125, 0.0078125, 12.0)
        assert "ambassador.retries" in second  # unchanged since the first, still reported
    else:
        assert (ok["count"], ok["sum"], ok["min"], ok["max"]) == (2, 1.5, 0.5, 1.0)
        assert "ambassador.retries" not in second  # no retry in the second interval
