"""What tracing costs: keep-alive pass-through with tracing off, sampled at 1%, and at 100%.

One run, three daemons over the same canned upstream, loaded one after the other in
alternating rounds (off, 1%, 100%, then reversed, ...). Traced daemons export over OTLP/HTTP
to a do-nothing sink (bench/otlp_sink.py), so the SDK does all its real work: span creation,
batching, protobuf serialisation and the POSTs in its background thread. Prints req/s, p50/p99
and daemon CPU per request, and each traced scenario's cost against `off` (1 - throughput
ratio, and the CPU-per-request ratio, which machine noise moves less). Results also go to
bench/results/tracing.json.

Usage: .venv/bin/python bench/tracing.py [--quick] [--rounds 3] [--size 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from loadgen import GeneratorName, LoadSpec, run_load, wrk_path
from servers import LOOPBACK, ServerProcess, daemon_argv, start_server

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "tracing.json"
# scenario -> OTEL_* environment for the daemon (None: tracing off, the default)
SCENARIOS: dict[str, dict[str, str] | None] = {
    "off": None,
    "sampled-1%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "sampled-100%": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
}


def _daemon(name: str, upstream: int, sink: int, extra_env: dict[str, str] | None) -> ServerProcess:
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("OTEL_")]:
            del os.environ[key]
        if extra_env is not None:
            os.environ.update(
                {
                    "OTEL_TRACES_EXPORTER": "otlp",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{LOOPBACK}:{sink}",
                    **extra_env,
                }
            )
        return start_server(
            name,
            daemon_argv(f"http://{LOOPBACK}:{upstream}"),
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s per load, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    duration, warmup, rounds = (1.0, 0.25, 1) if args.quick else (args.duration, 1.0, args.rounds)
    generator: GeneratorName = "wrk" if wrk_path() else "builtin"
    upstream = start_server(
        "upstream",
        lambda port: [
            sys.executable,
            str(BENCH_DIR / "canned_upstream.py"),
            "--listen",
            str(port),
            "--size",
            str(args.size),
        ],
    )
    sink = start_server(
        "otlp-sink", lambda port: [sys.executable, str(BENCH_DIR / "otlp_sink.py"), "--listen", str(port)]
    )
    daemons = {name: _daemon(name, upstream.port, sink.port, env) for name, env in SCENARIOS.items()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SCENARIOS}
    try:
        order = list(SCENARIOS)
        for round_no in range(rounds):
            for name in order if round_no % 2 == 0 else list(reversed(order)):
                daemon = daemons[name]
                spec = LoadSpec(LOOPBACK, daemon.port, args.connections, duration, warmup, processes=2)
                cpu: list[float] = []

                def start(d: ServerProcess = daemon, c: list[float] = cpu) -> None:
                    c.append(d.cpu_s() or 0.0)

                def end(d: ServerProcess = daemon, c: list[float] = cpu) -> None:
                    c.append(d.cpu_s() or 0.0)

                result = run_load(spec, generator, on_measure_start=start, on_measure_end=end)
                cpu_us = (cpu[1] - cpu[0]) / max(result.requests, 1) * 1e6
                runs[name].append(
                    {
                        "rps": result.requests_per_s,
                        "p50_ms": result.percentiles_ms.get("p50", float("nan")),
                        "p99_ms": result.percentiles_ms.get("p99", float("nan")),
                        "cpu_us_per_request": cpu_us,
                        "errors": float(result.error_count),
                    }
                )
                print(
                    f"  round {round_no + 1}/{rounds} {name:13s} "
                    f"{result.requests_per_s:8.0f} req/s  {cpu_us:6.0f} us CPU/req",
                    flush=True,
                )
    finally:
        for server in (*daemons.values(), sink, upstream):
            server.close()
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    base = summary["off"]
    header = ("scenario", "req/s", "p50 ms", "p99 ms", "CPU us/req", "cost (req/s)", "CPU ratio")
    print("\n{:14s} {:>8s} {:>7s} {:>7s} {:>10s} {:>12s} {:>9s}".format(*header))
    for name, s in summary.items():
        cost = 1 - s["rps"] / base["rps"] if base["rps"] else float("nan")
        ratio = (
            s["cpu_us_per_request"] / base["cpu_us_per_request"]
            if base["cpu_us_per_request"]
            else float("nan")
        )
        s["cost"], s["cpu_ratio"] = cost, ratio
        print(
            f"{name:14s} {s['rps']:8.0f} {s['p50_ms']:7.2f} {s['p99_ms']:7.2f} "
            f"{s['cpu_us_per_request']:10.0f} {cost:12.1%} {ratio:9.2f}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps({"generator": generator, "rounds": rounds, "summary": summary, "runs": runs}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
