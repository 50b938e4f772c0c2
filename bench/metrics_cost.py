"""What per-request metrics cost with tracing off: a micro-benchmark, no sockets.

Times (1) one server-duration histogram record as a stage makes it, and (2) a request
through RequestTelemetry -> AttemptTelemetry -> a handler answering at once, minus the same
request through that handler alone: the two telemetry stages' whole cost per request (the
server and attempt duration histograms, the W3C header check, the clock reads), and (3) the
same with every per-request instrument replaced by one that does nothing: (2) - (3) is what
recording the metrics costs per request. A `cache` outcome is set so a counter is added as
well. Best of --repeat runs, in microseconds of this process's CPU time (other load on
the machine then matters less than with wall-clock time).

It uses only the stages' constructors, so it runs unchanged against an older checkout:
    PYTHONPATH=/path/to/checkout .venv/bin/python bench/metrics_cost.py

Usage: .venv/bin/python bench/metrics_cost.py [--requests 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
import timeit
from typing import Any

import trio

from resilient_ambassador.config_loader import parse_upstream_url
from resilient_ambassador.core.config import RouteConfig, TelemetryConfig, UpstreamConfig
from resilient_ambassador.core.messages import Handler, Request, Response
from resilient_ambassador.stages.telemetry import AttemptTelemetry, RequestTelemetry
from resilient_ambassador.telemetry import Telemetry

ATTRIBUTES = {
    "http.request.method": "GET",
    "http.response.status_code": 200,
    "http.response.status_class": "2xx",
    "http.route": "/",
    "ambassador.route": "r",
    "ambassador.upstream": "up",
}


def record_cost_us(telemetry: Telemetry, number: int, repeat: int) -> float:
    """One histogram record as the stage makes it (bound once, or the SDK instrument)."""
    family: Any = telemetry.server_duration
    if hasattr(family, "bind"):
        record = family.bind(ATTRIBUTES)
        return (
            min(timeit.repeat(lambda: record(0.0123), number=number, repeat=repeat, timer=time.process_time))
            / number
            * 1e6
        )
    return (
        min(
            timeit.repeat(
                lambda: family.record(0.0123, ATTRIBUTES),
                number=number,
                repeat=repeat,
                timer=time.process_time,
            )
        )
        / number
        * 1e6
    )


class _Nothing:
    """An instrument that records nothing, in the stages' current (bind) and older (SDK
    instrument) shapes."""

    def bind(self, attributes: object) -> Any:
        return self._nothing

    def record(self, value: float, attributes: object = None) -> None:
        return None

    add = record

    def _nothing(self, value: float) -> None:
        return None


def without_metrics(telemetry: Telemetry) -> Telemetry:
    for name in ("server_duration", "client_duration", "retries", "cache_lookups", "rate_limit_decisions"):
        setattr(telemetry, name, _Nothing())
    return telemetry


async def _answer(request: Request) -> Response:
    del request
    return Response(status=200, headers=[])


async def _cached(request: Request) -> Response:
    request.outcome.cache = "miss"
    return await _answer(request)


async def _per_request_s(handler: Handler, requests: int) -> float:
    headers = [(b"host", b"example"), (b"accept", b"*/*")]
    started = time.process_time()
    for _ in range(requests):
        await handler(Request(method=b"GET", target=b"/x", headers=list(headers)))
    return (time.process_time() - started) / requests


def stage_costs_us(telemetries: list[Telemetry], requests: int, repeat: int) -> list[float]:
    """Per telemetry, the stages' cost per request: best of `repeat` rounds, each round timing
    the bare handler and every telemetry one after the other (a busy machine then slows them
    alike)."""
    upstream = UpstreamConfig(name="up", url=parse_upstream_url("http://127.0.0.1:9"))
    route = RouteConfig(upstream="up", name="r")
    handlers: list[Handler] = [_cached]
    for telemetry in telemetries:
        stages = RequestTelemetry(AttemptTelemetry(_answer, telemetry, upstream), telemetry, route)

        async def cache_outcome(request: Request, stages: Handler = stages) -> Response:
            request.outcome.cache = "miss"
            return await stages(request)

        handlers.append(cache_outcome)

    async def run() -> list[float]:
        best = [float("inf")] * len(handlers)
        for _ in range(repeat):
            for i, handler in enumerate(handlers):
                best[i] = min(best[i], await _per_request_s(handler, requests))
        return [(b - best[0]) * 1e6 for b in best[1:]]

    return trio.run(run)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    telemetry = Telemetry(TelemetryConfig(), {})
    record_us = record_cost_us(telemetry, args.requests, args.repeat)
    print(f"histogram record:                          {record_us:6.2f} us")
    bare = without_metrics(Telemetry(TelemetryConfig(), {}))
    stages_us, bare_us = stage_costs_us([telemetry, bare], args.requests, args.repeat)
    print(f"RequestTelemetry+AttemptTelemetry/request: {stages_us:6.2f} us")
    print(f"  the same without recording metrics:      {bare_us:6.2f} us")
    print(f"  recording the metrics:                   {stages_us - bare_us:6.2f} us/request")
    telemetry.shutdown()


if __name__ == "__main__":
    main()
