"""What per-request metrics cost with tracing off: a micro-benchmark, no sockets.

Times (1) one server-duration histogram record as a stage makes it, and (2) a request
through RequestTelemetry -> AttemptTelemetry -> a handler answering at once, minus the same
request through that handler alone: the two telemetry stages' whole cost per request (the
server and attempt duration histograms, the W3C header check, the clock reads). A `cache`
outcome is set so a counter is added as well. Best of --repeat runs, microseconds.

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
        return min(timeit.repeat(lambda: record(0.0123), number=number, repeat=repeat)) / number * 1e6
    return (
        min(timeit.repeat(lambda: family.record(0.0123, ATTRIBUTES), number=number, repeat=repeat))
        / number
        * 1e6
    )


async def _answer(request: Request) -> Response:
    del request
    return Response(status=200, headers=[])


async def _cached(request: Request) -> Response:
    request.outcome.cache = "miss"
    return await _answer(request)


async def _per_request_s(handler: Handler, requests: int) -> float:
    headers = [(b"host", b"example"), (b"accept", b"*/*")]
    started = time.perf_counter()
    for _ in range(requests):
        await handler(Request(method=b"GET", target=b"/x", headers=list(headers)))
    return (time.perf_counter() - started) / requests


def stage_cost_us(telemetry: Telemetry, requests: int, repeat: int) -> float:
    upstream = UpstreamConfig(name="up", url=parse_upstream_url("http://127.0.0.1:9"))
    route = RouteConfig(upstream="up", name="r")
    stages = RequestTelemetry(AttemptTelemetry(_answer, telemetry, upstream), telemetry, route)

    async def cache_outcome(request: Request) -> Response:
        request.outcome.cache = "miss"
        return await stages(request)

    async def run() -> float:
        best = float("inf")
        for _ in range(repeat):
            bare = await _per_request_s(_cached, requests)
            full = await _per_request_s(cache_outcome, requests)
            best = min(best, full - bare)
        return best * 1e6

    return trio.run(run)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    telemetry = Telemetry(TelemetryConfig(), {})
    record_us = record_cost_us(telemetry, args.requests, args.repeat)
    print(f"histogram record:                          {record_us:6.2f} us")
    stages_us = stage_cost_us(telemetry, args.requests, args.repeat)
    print(f"RequestTelemetry+AttemptTelemetry/request: {stages_us:6.2f} us")
    telemetry.shutdown()


if __name__ == "__main__":
    main()
