"""OpenTelemetry for one daemon: its tracer and meter, and every span and metric name.

Each `App` owns its own providers (nothing global), so tests can run several daemons in one
process and a reload never mixes two configs' instruments. Configuration follows the standard
`OTEL_*` environment variables (the SDK reads `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER`/`_ARG` and `OTEL_EXPORTER_OTLP_*` itself); the config file's `telemetry`
block, where set, wins. Traces are off unless an exporter is chosen: with none, no span object
is ever created. Metrics are always kept and served in the Prometheus text format on the admin
listener's `/metrics`, and pushed over OTLP as well when asked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry, generate_latest

from resilient_ambassador import __version__
from resilient_ambassador.core.config import TelemetryConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics._internal.export import MetricExporter

log = logging.getLogger("resilient_ambassador.telemetry")

SCOPE = "resilient_ambassador"
DEFAULT_SERVICE_NAME = "resilient-ambassador"

# Span names (HTTP semantic conventions: "{method} {http.route}" for the server span, "{method}"
# for the client span) are built in stages/telemetry.py; metric names live here.
SERVER_DURATION = "http.server.request.duration"
CLIENT_DURATION = "http.client.request.duration"
RETRIES = "ambassador.retries"
BREAKER_STATE = "ambassador.breaker.state"
BREAKER_TRANSITIONS = "ambassador.breaker.transitions"
RATE_LIMIT_DECISIONS = "ambassador.rate_limit.decisions"
RATE_LIMIT_WAIT = "ambassador.rate_limit.queue_wait"
CACHE_LOOKUPS = "ambassador.cache.lookups"
OPEN_CONNECTIONS = "ambassador.connections.open"
LISTENER_RESPONSES = "ambassador.listener.responses"
REDIS_CALLS = "ambassador.redis.calls"
REDIS_FAILURES = "ambassador.redis.failures"
REDIS_SKIPPED = "ambassador.redis.skipped"
RELOADS = "ambassador.config.reloads"
CACHE_EVENTS = "ambassador.cache.events"
CACHE_STORE_BYTES = "ambassador.cache.store.size"
CACHE_STORE_ENTRIES = "ambassador.cache.store.entries"
RATE_LIMIT_FALLBACKS = "ambassador.rate_limit.backend_fallbacks"
ACCESS_LOG_DROPPED = "ambassador.access_log.dropped"

# The HTTP semantic conventions' duration buckets (seconds), which Prometheus users expect.
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

Attributes = Mapping[str, str | int | float | bool]
ObservedValues = Callable[[], Iterable[tuple[float, Attributes]]]


@final
@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """The effective settings: config file over environment over defaults."""

    traces_exporter: str  # none | console | otlp
    metrics_exporter: str  # none | otlp (Prometheus /metrics is always there)
    service_name: str | None
    otlp_endpoint: str | None
    sampler_ratio: float | None  # None: the SDK's own (OTEL_TRACES_SAMPLER, default parentbased_always_on)
    metrics_interval_s: float | None  # None: the SDK's (OTEL_METRIC_EXPORT_INTERVAL, else 60 s)

    @classmethod
    def resolve(cls, config: TelemetryConfig, environ: Mapping[str, str] = os.environ) -> TelemetrySettings:
        def exporter(value: str | None, variable: str) -> str:
            chosen = (value or environ.get(variable, "none") or "none").strip().lower()
            # OTEL_*_EXPORTER may list several; we support one of ours.
            first = chosen.split(",")[0].strip()
            return first if first in ("none", "console", "otlp", "prometheus") else "none"

        metrics = exporter(config.metrics_exporter, "OTEL_METRICS_EXPORTER")
        return cls(
            traces_exporter=exporter(config.traces_exporter, "OTEL_TRACES_EXPORTER"),
            metrics_exporter="otlp" if metrics == "otlp" else "none",
            service_name=config.service_name,
            otlp_endpoint=config.otlp_endpoint,
            sampler_ratio=config.sampler_ratio,
            metrics_interval_s=config.metrics_interval_s,
        )


@final
class Telemetry:
    def __init__(
        self,
        config: TelemetryConfig,
        environ: Mapping[str, str] = os.environ,
        *,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        """`span_exporter` overrides the configured one and exports each span as it ends
        (tests use an in-memory exporter)."""
        self.settings = settings = TelemetrySettings.resolve(config, environ)
        attributes: dict[str, str] = {"service.version": __version__}
        if settings.service_name is not None:
            attributes[SERVICE_NAME] = settings.service_name
        elif "OTEL_SERVICE_NAME" not in environ:
            attributes[SERVICE_NAME] = DEFAULT_SERVICE_NAME
        resource = Resource.create(attributes)  # merges OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME

        self._tracer_provider: TracerProvider | None = None
        self.tracer: Tracer | None = None
        exporter = span_exporter or self._span_exporter(settings)
        if exporter is not None:
            sampler: Sampler | None = None
            if settings.sampler_ratio is not None:
                sampler = ParentBased(TraceIdRatioBased(settings.sampler_ratio))
            self._tracer_provider = TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)
            processor = SimpleSpanProcessor(exporter) if span_exporter else BatchSpanProcessor(exporter)
            self._tracer_provider.add_span_processor(processor)
            self.tracer = self._tracer_provider.get_tracer(SCOPE, __version__)

        self.registry = CollectorRegistry(auto_describe=True)
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry)]
        metric_exporter = self._metric_exporter(settings)
        if metric_exporter is not None:
            interval = settings.metrics_interval_s
            readers.append(
                PeriodicExportingMetricReader(
                    metric_exporter, export_interval_millis=None if interval is None else interval * 1000
                )
            )
        self._meter_provider = MeterProvider(
            resource=resource,
            metric_readers=readers,
            views=[
                View(
                    instrument_name="*duration",
                    aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS_S),
                ),
                View(
                    instrument_name=RATE_LIMIT_WAIT,
                    aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS_S),
                ),
            ],
            shutdown_on_exit=False,
        )
        meter = self._meter_provider.get_meter(SCOPE, __version__)
        self.meter = meter
        self.server_duration = meter.create_histogram(
            SERVER_DURATION, unit="s", description="Downstream requests: time to the response head"
        )
        self.client_duration = meter.create_histogram(
            CLIENT_DURATION, unit="s", description="Upstream attempts: time to the response head"
        )
        self.retries = meter.create_counter(RETRIES, unit="{retry}", description="Upstream retries")
        self.breaker_transitions = meter.create_counter(
            BREAKER_TRANSITIONS, unit="{transition}", description="Circuit breaker state changes"
        )
        self.rate_limit_decisions = meter.create_counter(
            RATE_LIMIT_DECISIONS, unit="{request}", description="Rate-limit outcomes"
        )
        self.rate_limit_wait = meter.create_histogram(
            RATE_LIMIT_WAIT, unit="s", description="Time requests waited in a rate-limit queue"
        )
        self.cache_lookups = meter.create_counter(
            CACHE_LOOKUPS, unit="{request}", description="Cache outcomes (Cache-Status terms)"
        )
        self.reloads = meter.create_counter(RELOADS, unit="{reload}", description="Config reloads by result")

    def observe(self, name: str, kind: str, unit: str, description: str, values: ObservedValues) -> None:
        """An instrument read when metrics are collected (from counters the daemon keeps
        anyway): `kind` is gauge, counter or updown."""

        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, dict(attributes)) for value, attributes in values()]

        create = {
            "gauge": self.meter.create_observable_gauge,
            "counter": self.meter.create_observable_counter,
            "updown": self.meter.create_observable_up_down_counter,
        }[kind]
        create(name, callbacks=[callback], unit=unit, description=description)

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        """Flush and stop the exporters (blocking: call it from a worker thread)."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        self._meter_provider.shutdown(timeout_millis=2_000)

    def _span_exporter(self, settings: TelemetrySettings) -> SpanExporter | None:
        if settings.traces_exporter == "console":
            return ConsoleSpanExporter()
        if settings.traces_exporter != "otlp":
            return None
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.error(
                "traces exporter otlp needs the OTLP extra: pip install 'resilient-ambassador[otlp]'; "
                "tracing stays off"
            )
            return None
        endpoint = settings.otlp_endpoint
        return OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces" if endpoint else None)

    def _metric_exporter(self, settings: TelemetrySettings) -> MetricExporter | None:
        if settings.metrics_exporter != "otlp":
            return None
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        except ImportError:
            log.error("metrics exporter otlp needs the OTLP extra: pip install 'resilient-ambassador[otlp]'")
            return None
        endpoint = settings.otlp_endpoint
        return OTLPMetricExporter(endpoint=f"{endpoint.rstrip('/')}/v1/metrics" if endpoint else None)
