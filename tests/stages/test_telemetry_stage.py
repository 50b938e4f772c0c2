"""The request and attempt telemetry stages on trio's MockClock, behind a real retry stage:
every duration is exact, so the exported histograms and counters are pinned per attribute
set, pre-aggregated with tracing off and on, and through the SDK's own instruments alike."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from resilient_ambassador.app import build_pipeline
from resilient_ambassador.config_loader import parse_upstream_url
from resilient_ambassador.core.config import RetryConfig, RouteConfig, TelemetryConfig, UpstreamConfig
from resilient_ambassador.core.errors import ProxyError, UpstreamTimeout
from resilient_ambassador.core.messages import Request, Response
from resilient_ambassador.stages.telemetry import AttemptTelemetry
from resilient_ambassador.telemetry import Telemetry

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
UPSTREAM = UpstreamConfig(name="up", url=parse_upstream_url("http://127.0.0.1:8080"))
# One retry, no backoff sleep: the server durations are the attempts' sums.
ROUTE = RouteConfig(
    upstream="up", name="r", retry=RetryConfig(retries=1, backoff_base_s=0.0, backoff_max_s=0.0)
)


@dataclass(frozen=True)
class Step:
    delay_s: float
    status: int = 200
    error: ProxyError | None = None


class Scripted:
    """An upstream handler answering each attempt from a script, after its delay."""

    def __init__(self, *steps: Step) -> None:
        self.steps = deque(steps)

    async def __call__(self, request: Request) -> Response:
        step = self.steps.popleft()
        await trio.sleep(step.delay_s)
        if step.error is not None:
            raise step.error
        return Response(status=step.status, headers=[])


async def _run(telemetry: Telemetry, *requests: tuple[bytes, tuple[Step, ...]]) -> list[int]:
    """The status each request got (a ProxyError's for those the daemon answers itself)."""
    statuses = []
    for method, steps in requests:
        upstream = Scripted(*steps)
        handler = build_pipeline(ROUTE, AttemptTelemetry(upstream, telemetry, UPSTREAM), telemetry)
        try:
            statuses.append((await handler(Request(method=method, target=b"/x", headers=[]))).status)
        except ProxyError as exc:
            statuses.append(exc.status)
        assert not upstream.steps
    return statuses


def _samples(telemetry: Telemetry) -> Samples:
    text = telemetry.prometheus_text().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if not k.startswith("otel_scope_")}
            samples[sample.name, frozenset(labels.items())] = sample.value
    return samples


SERVER = {
    "http_request_method": "GET",
    "http_route": "/",
    "ambassador_route": "r",
    "ambassador_upstream": "up",
}
CLIENT = {"server_address": "127.0.0.1", "server_port": "8080", "ambassador_upstream": "up"}


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


@pytest.mark.parametrize(
    ("traced", "sdk"), [(False, False), (True, False), (False, True)], ids=["aggregated", "traced", "sdk"]
)
async def test_stages_export_pinned_values_across_two_collections(
    autojump_clock: trio.testing.MockClock, traced: bool, sdk: bool
) -> None:
    telemetry = Telemetry(
        TelemetryConfig(), {}, span_exporter=InMemorySpanExporter() if traced else None, sdk_instruments=sdk
    )
    assert telemetry.aggregated is not sdk
    statuses = await _run(
        telemetry,
        (b"GET", (Step(0.25),)),
        (b"GET", (Step(0.125, status=503), Step(0.5))),  # retried: one request, two attempts
        (b"POST", (Step(1.0, error=UpstreamTimeout("slow")),)),  # POST is not retried
    )
    assert statuses == [200, 200, 504]
    first = _samples(telemetry)
    assert await _run(telemetry, (b"GET", (Step(3.0),))) == [200]
    second = _samples(telemetry)

    ok = {**SERVER, "http_response_status_code": "200", "http_response_status_class": "2xx"}
    duration = "http_server_request_duration_seconds"
    assert _get(first, f"{duration}_count", **ok) == 2
    assert _get(first, f"{duration}_sum", **ok) == 0.875
    assert [
        _get(first, f"{duration}_bucket", **ok, le=le) for le in ("0.1", "0.25", "0.5", "0.75", "+Inf")
    ] == [
        0,
        1,
        1,
        2,
        2,
    ]
    timeout = {**SERVER, "http_request_method": "POST", "http_response_status_code": "504"}
    timeout["http_response_status_class"] = "5xx"
    assert (_get(first, f"{duration}_count", **timeout), _get(first, f"{duration}_sum", **timeout)) == (
        1,
        1.0,
    )

    attempt = "http_client_request_duration_seconds"
    # The exporter gives every sample of a family the same label names: "" where unset.
    by_outcome = {
        "200": {**CLIENT, "http_request_method": "GET", "http_response_status_code": "200", "error_type": ""},
        "503": {**CLIENT, "http_request_method": "GET", "http_response_status_code": "503", "error_type": ""},
        "timeout": {
            **CLIENT,
            "http_request_method": "POST",
            "http_response_status_code": "",
            "error_type": "upstream_timeout",
        },
    }
    assert {k: _get(first, f"{attempt}_sum", **v) for k, v in by_outcome.items()} == {
        "200": 0.75,
        "503": 0.125,
        "timeout": 1.0,
    }
    assert _get(first, "ambassador_retries_total", ambassador_route="r", ambassador_upstream="up") == 1

    # Cumulative: the second collection adds the 3 s request to the first's.
    assert _get(second, f"{duration}_count", **ok) == 3
    assert _get(second, f"{duration}_sum", **ok) == 3.875
    assert _get(second, f"{duration}_bucket", **ok, le="2.5") == 2
    assert _get(second, f"{duration}_bucket", **ok, le="5.0") == 3
    assert _get(second, f"{attempt}_count", **by_outcome["200"]) == 3
    assert _get(second, f"{duration}_count", **timeout) == 1
    assert _get(second, "ambassador_retries_total", ambassador_route="r", ambassador_upstream="up") == 1
