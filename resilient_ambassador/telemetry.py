"""OpenTelemetry for one daemon: its tracer and meter, and every span and metric name.

Each `App` owns its own providers (nothing global), so tests can run several daemons in one
process and a reload never mixes two configs' instruments. Configuration follows the standard
`OTEL_*` environment variables (the SDK reads `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER`/`_ARG` and `OTEL_EXPORTER_OTLP_*` itself); the config file's `telemetry`
block, where set, wins. Traces are off unless an exporter is chosen: with none, no span object
is ever created. Metrics are always kept and served in the Prometheus text format on the admin
listener's `/metrics`, and pushed over OTLP as well when asked.

The per-request instruments (durations, retries, cache and rate-limit outcomes) are families
that a stage binds once per attribute set. They are aggregated here, in cells costing a bisect
and a few additions per request, and handed to the SDK's readers as ordinary `Metric`s when
they collect: the SDK's synchronous instruments cost ~15-25 us per call (attribute cleaning,
sorting and hashing per measurement), as much as the rest of a sampled-out trace. So histogram
points carry no trace exemplars. `sdk_instruments=True` makes them SDK instruments again: the
reference the tests hold the aggregated export to.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from time import time_ns
from typing import Any, Generic, Protocol, TypeVar, final

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk import metrics as sdk_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
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
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry, generate_latest

from resilient_ambassador import __version__
from resilient_ambassador.core.config import TelemetryConfig

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


Record = Callable[[float], None]
# The SDK's default per-stream cardinality limit: attribute sets beyond it share one overflow point.
CARDINALITY_LIMIT = 2000
_OVERFLOW: Attributes = {"otel.metric.overflow": True}
ANCHOR_SCOPE = "resilient_ambassador.anchor"  # see Aggregated; never exported


class Family(Protocol):
    """A metric whose attribute sets are bound once (per route and status, say) and then
    recorded into by calling the bound `Record` with the value alone."""

    def bind(self, attributes: Attributes) -> Record: ...


@final
class _SdkFamily:
    """An SDK synchronous instrument's `record` or `add`: each call pays the SDK's price."""

    def __init__(self, method: Callable[..., None]) -> None:
        self._method = method

    def bind(self, attributes: Attributes) -> Record:
        return partial(self._method, attributes=dict(attributes))


@final
class HistogramCell:
    """One attribute set's explicit-bucket histogram, cumulative since it was created. The lock
    is uncontended on the event loop; it keeps a collection in an exporter thread from seeing
    a count without its bucket."""

    __slots__ = (
        "_bounds",
        "_lock",
        "attributes",
        "bucket_counts",
        "count",
        "interval_max",
        "interval_min",
        "interval_sum",
        "max",
        "min",
        "start_ns",
        "sum",
    )

    def __init__(self, attributes: Attributes, bounds: tuple[float, ...]) -> None:
        self.attributes = attributes
        self.start_ns = time_ns()
        self._bounds = bounds
        self._lock = threading.Lock()
        self.bucket_counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = self.interval_sum = 0.0
        self.min = self.interval_min = math.inf
        self.max = self.interval_max = -math.inf

    def record(self, value: float) -> None:
        if not 0.0 <= value < math.inf:  # the SDK drops these too (negative, inf, NaN)
            return
        # bisect_left: a value equal to a boundary falls in that bucket (`le`), as in the SDK.
        index = bisect_left(self._bounds, value)
        with self._lock:
            self.bucket_counts[index] += 1
            self.count += 1
            self.sum += value
            self.interval_sum += value
            if value < self.min:
                self.min = value
            if value > self.max:
                self.max = value
            if value < self.interval_min:
                self.interval_min = value
            if value > self.interval_max:
                self.interval_max = value

    def snapshot(
        self, *, new_interval: bool
    ) -> tuple[tuple[int, ...], int, float, float, float, tuple[float, float, float]]:
        """Counts, count, sum, min and max, and the sum, min and max since the last snapshot
        that started a `new_interval` (a delta reader's)."""
        with self._lock:
            interval = (self.interval_sum, self.interval_min, self.interval_max)
            if new_interval:
                self.interval_sum, self.interval_min, self.interval_max = 0.0, math.inf, -math.inf
            return tuple(self.bucket_counts), self.count, self.sum, self.min, self.max, interval


@final
class CounterCell:
    """One attribute set's monotonic sum. It has one writer, the event loop, so no lock: an
    exporter thread reads the value before or after an addition."""

    __slots__ = ("attributes", "start_ns", "value")

    def __init__(self, attributes: Attributes) -> None:
        self.attributes = attributes
        self.start_ns = time_ns()
        self.value: int | float = 0  # stays an int while ints are added, as in the SDK

    def add(self, amount: float) -> None:
        if amount >= 0:  # a counter only goes up; the SDK drops the rest too
            self.value += amount


C = TypeVar("C", HistogramCell, CounterCell)


class _Cells(Generic[C]):
    """Cells by attribute set, capped like the SDK's streams."""

    def __init__(self, name: str, unit: str, description: str, make: Callable[[Attributes], C]) -> None:
        self.name, self.unit, self.description = name, unit, description
        self._make: Callable[[Attributes], C] = make
        self._lock = threading.Lock()
        self._cells: dict[frozenset[tuple[str, str | int | float | bool]], C] = {}

    def cell(self, attributes: Attributes) -> C:
        key = frozenset(attributes.items())
        with self._lock:
            found = self._cells.get(key)
            if found is None:
                if len(self._cells) >= CARDINALITY_LIMIT:
                    key, attributes = frozenset(_OVERFLOW.items()), _OVERFLOW
                    found = self._cells.get(key)
                if found is None:
                    found = self._cells[key] = self._make(dict(attributes))
            return found

    def cells(self) -> list[C]:
        with self._lock:
            return list(self._cells.values())


@final
class HistogramFamily:
    """A pre-aggregated explicit-bucket histogram."""

    def __init__(self, name: str, unit: str, description: str, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.cells = _Cells(name, unit, description, lambda attributes: HistogramCell(attributes, bounds))

    def bind(self, attributes: Attributes) -> Record:
        return self.cells.cell(attributes).record


@final
class CounterFamily:
    """A pre-aggregated monotonic counter."""

    def __init__(self, name: str, unit: str, description: str) -> None:
        self.cells = _Cells(name, unit, description, CounterCell)

    def bind(self, attributes: Attributes) -> Record:
        return self.cells.cell(attributes).add


@final
class ReaderState:
    """What one reader saw at its last collection, to turn cumulative cells into deltas. (A
    histogram's delta sum, min and max come from the cell's interval fields, which a delta
    collection resets: we build at most one delta reader, the OTLP one.)"""

    def __init__(self, histograms: AggregationTemporality, counters: AggregationTemporality) -> None:
        self.lock = threading.Lock()  # a flush may race the periodic reader's thread
        self.histograms = histograms
        self.counters = counters
        self.collected_ns: int | None = None
        self.seen_counts: dict[int, tuple[int, ...]] = {}  # by id(cell): cells live as long as we do
        self.seen_values: dict[int, int | float] = {}


@final
class Aggregated:
    """The pre-aggregated families, turned into SDK `Metric`s at collection time and merged
    into what the SDK collected itself, in our instrumentation scope.

    A reader is only handed a collection when the SDK has points of its own, so `anchor`
    keeps one observation in the ANCHOR_SCOPE meter, which `merge` takes out again: it never
    reaches an exporter."""

    def __init__(self, scope: InstrumentationScope) -> None:
        self._scope = scope
        self._histograms: list[HistogramFamily] = []
        self._counters: list[CounterFamily] = []

    @staticmethod
    def anchor(provider: MeterProvider) -> None:
        provider.get_meter(ANCHOR_SCOPE).create_observable_gauge(
            "anchor", callbacks=[lambda _options: [Observation(0)]]
        )

    def histogram(self, name: str, unit: str, description: str, bounds: tuple[float, ...]) -> HistogramFamily:
        family = HistogramFamily(name, unit, description, bounds)
        self._histograms.append(family)
        return family

    def counter(self, name: str, unit: str, description: str) -> CounterFamily:
        family = CounterFamily(name, unit, description)
        self._counters.append(family)
        return family

    def merge(self, data: MetricsData, state: ReaderState) -> MetricsData | None:
        """What the SDK collected, without the anchor, with ours in our scope; None when that
        is nothing (the SDK then calls no exporter either)."""
        ours = self.metrics(state)
        merged: list[ResourceMetrics] = []
        for resource_metrics in data.resource_metrics:
            scopes = [s for s in resource_metrics.scope_metrics if s.scope.name != ANCHOR_SCOPE]
            if ours:  # one resource: ours go into the first
                for i, scope_metrics in enumerate(scopes):
                    if scope_metrics.scope == self._scope:
                        scopes[i] = dataclasses.replace(
                            scope_metrics, metrics=[*scope_metrics.metrics, *ours]
                        )
                        break
                else:
                    schema_url = self._scope.schema_url or ""
                    scopes.append(ScopeMetrics(scope=self._scope, metrics=ours, schema_url=schema_url))
                ours = []
            if scopes:
                merged.append(dataclasses.replace(resource_metrics, scope_metrics=scopes))
        return MetricsData(resource_metrics=merged) if merged else None

    def metrics(self, state: ReaderState) -> list[Metric]:
        """This collection's points: cumulative ones as they are, delta ones as the change since
        this reader's last collection (attribute sets without a change are left out, as the
        SDK does)."""
        with state.lock:
            return self._metrics(state)

    def _metrics(self, state: ReaderState) -> list[Metric]:
        now_ns = time_ns()
        previous_ns = state.collected_ns
        state.collected_ns = now_ns
        delta_h = state.histograms is AggregationTemporality.DELTA
        delta_c = state.counters is AggregationTemporality.DELTA
        metrics: list[Metric] = []
        for histogram in self._histograms:
            points: list[HistogramDataPoint] = []
            for cell in histogram.cells.cells():
                counts, count, total, low, high, interval = cell.snapshot(new_interval=delta_h)
                start_ns = cell.start_ns
                if delta_h:
                    last_counts = state.seen_counts.get(id(cell), (0,) * len(counts))
                    state.seen_counts[id(cell)] = counts
                    if counts == last_counts:
                        continue
                    counts = tuple(now - then for now, then in zip(counts, last_counts, strict=True))
                    count, (total, low, high) = sum(counts), interval
                    start_ns = previous_ns if previous_ns is not None and previous_ns > start_ns else start_ns
                points.append(
                    HistogramDataPoint(
                        attributes=cell.attributes,
                        start_time_unix_nano=start_ns,
                        time_unix_nano=now_ns,
                        count=count,
                        sum=total,
                        bucket_counts=counts,
                        explicit_bounds=histogram.bounds,
                        min=low,
                        max=high,
                    )
                )
            if points:
                cells = histogram.cells
                metrics.append(
                    Metric(
                        name=cells.name,
                        description=cells.description,
                        unit=cells.unit,
                        data=Histogram(data_points=points, aggregation_temporality=state.histograms),
                    )
                )
        for counter in self._counters:
            numbers: list[NumberDataPoint] = []
            for number in counter.cells.cells():
                value, start_ns = number.value, number.start_ns
                if delta_c:
                    last_value = state.seen_values.get(id(number), 0)
                    state.seen_values[id(number)] = value
                    if value == last_value:
                        continue
                    value -= last_value
                    start_ns = previous_ns if previous_ns is not None and previous_ns > start_ns else start_ns
                numbers.append(
                    NumberDataPoint(
                        attributes=number.attributes,
                        start_time_unix_nano=start_ns,
                        time_unix_nano=now_ns,
                        value=value,
                    )
                )
            if numbers:
                metrics.append(
                    Metric(
                        name=counter.cells.name,
                        description=counter.cells.description,
                        unit=counter.cells.unit,
                        data=Sum(
                            data_points=numbers, aggregation_temporality=state.counters, is_monotonic=True
                        ),
                    )
                )
        return metrics


def _temporality(
    preferred: Mapping[type, AggregationTemporality] | None, kind: type
) -> AggregationTemporality:
    return (preferred or {}).get(kind, AggregationTemporality.CUMULATIVE)


@final
class _PrometheusReader(PrometheusMetricReader):
    """The Prometheus reader, with our aggregates merged into each scrape (always cumulative)."""

    def __init__(self, aggregated: Aggregated, registry: CollectorRegistry) -> None:
        super().__init__(registry=registry)
        self._aggregated = aggregated
        cumulative = AggregationTemporality.CUMULATIVE
        self._state = ReaderState(cumulative, cumulative)

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        merged = self._aggregated.merge(metrics_data, self._state)
        if merged is not None:
            super()._receive_metrics(merged, timeout_millis, **kwargs)


@final
class _PeriodicReader(PeriodicExportingMetricReader):
    """The OTLP push reader, with our aggregates merged into each export, in the temporality
    the exporter prefers (OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE)."""

    def __init__(
        self, aggregated: Aggregated, exporter: MetricExporter, export_interval_millis: float | None
    ) -> None:
        super().__init__(exporter, export_interval_millis=export_interval_millis)
        self._aggregated = aggregated
        # The SDK's own reader takes its preferences from the same exporter attribute.
        preferred = exporter._preferred_temporality
        self._state = ReaderState(
            _temporality(preferred, sdk_metrics.Histogram), _temporality(preferred, sdk_metrics.Counter)
        )

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        merged = self._aggregated.merge(metrics_data, self._state)
        if merged is not None:
            super()._receive_metrics(merged, timeout_millis, **kwargs)


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
        sdk_instruments: bool = False,
    ) -> None:
        """`span_exporter` overrides the configured one and exports each span as it ends
        (tests use an in-memory exporter); `sdk_instruments` records the per-request metrics
        through the SDK's own instruments (the tests' reference; see the module docstring)."""
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
        # The scope get_meter(SCOPE, __version__) gives the SDK's instruments: ours join them.
        aggregates = Aggregated(InstrumentationScope(SCOPE, __version__))
        readers: list[MetricReader] = [_PrometheusReader(aggregates, self.registry)]
        metric_exporter = self._metric_exporter(settings)
        if metric_exporter is not None:
            interval = settings.metrics_interval_s
            readers.append(
                _PeriodicReader(aggregates, metric_exporter, None if interval is None else interval * 1000)
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
        # Per-request instruments: the cheap pre-aggregated families, unless asked otherwise.
        self.aggregated = not sdk_instruments
        if self.aggregated:
            aggregates.anchor(self._meter_provider)

        def histogram(name: str, description: str) -> Family:
            if self.aggregated:
                return aggregates.histogram(name, "s", description, DURATION_BUCKETS_S)
            return _SdkFamily(meter.create_histogram(name, unit="s", description=description).record)

        def counter(name: str, unit: str, description: str) -> Family:
            if self.aggregated:
                return aggregates.counter(name, unit, description)
            return _SdkFamily(meter.create_counter(name, unit=unit, description=description).add)

        self.server_duration = histogram(SERVER_DURATION, "Downstream requests: time to the response head")
        self.client_duration = histogram(CLIENT_DURATION, "Upstream attempts: time to the response head")
        self.retries = counter(RETRIES, "{retry}", "Upstream retries")
        self.rate_limit_decisions = counter(RATE_LIMIT_DECISIONS, "{request}", "Rate-limit outcomes")
        self.rate_limit_wait = histogram(RATE_LIMIT_WAIT, "Time requests waited in a rate-limit queue")
        self.cache_lookups = counter(CACHE_LOOKUPS, "{request}", "Cache outcomes (Cache-Status terms)")
        self.breaker_transitions = meter.create_counter(
            BREAKER_TRANSITIONS, unit="{transition}", description="Circuit breaker state changes"
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
