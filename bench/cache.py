"""Cache-hit benchmark: what a response served from the cache costs against a forward.

One run, three scenarios over the same fast upstream (a canned response of --size bytes that
carries no cache headers, so the daemon is told to keep it with --cache-ttl):

  forward       load generator -> resilient-ambassador -> upstream   (as deployed, no cache)
  cache-memory  the same with --cache-ttl 1h                        (every request after the
                                                                     first is a memory hit)
  cache-redis   the same with --cache-ttl 1h --redis URL            (a private redis-server;
                                                                     hits come from the
                                                                     near-cache, Redis is read
                                                                     about once a second)

Every scenario runs --repeat times (default 3) in rounds of alternating order; the table shows
medians: req/s, p50/p99 latency, daemon CPU per request, errors, and each cache scenario's
req/s and CPU-per-request ratio against `forward` (median of the per-round ratios). A hit is
cheap when its CPU per request is well below a forward's. Results go to
bench/results/cache.json. See bench/README.md.

Usage: .venv/bin/python bench/cache.py [--size 1024] [--quick] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgen import GeneratorName, LoadSpec, run_load, wrk_path
from servers import LOOPBACK, ServerProcess, daemon_argv, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
DEFAULT_JSON = BENCH_DIR / "results" / "cache.json"
SCENARIOS = ("forward", "cache-memory", "cache-redis")


@dataclass
class Run:
    scenario: str
    round_no: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    errors: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Cache-hit throughput against pass-through.")
    parser.add_argument("--size", type=int, default=1024, help="response body bytes (default 1024)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=None, help="measured seconds (default 5)")
    parser.add_argument("--warmup", type=float, default=None, help="unmeasured seconds first (default 1)")
    parser.add_argument("--processes", type=int, default=2, help="load processes (default 2)")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--generator", choices=["auto", "wrk", "builtin"], default="auto")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 5.0)
    args.warmup = args.warmup or (0.25 if args.quick else 1.0)
    args.repeat = args.repeat or (1 if args.quick else 3)
    return args


def upstream_program() -> Path:
    shared = Path(os.environ.get("AMBASSADOR_SHARED_DIR") or REPO_ROOT.parent / "shared")
    reference = shared / "bench-reference" / "canned_upstream.py"
    return reference if reference.is_file() else BENCH_DIR / "canned_upstream.py"


def run_scenario(
    args: argparse.Namespace,
    generator: GeneratorName,
    name: str,
    upstream: ServerProcess,
    redis_url: str,
    round_no: int,
) -> Run:
    flags = {"forward": [], "cache-memory": ["--cache-ttl", "1h"]}.get(name)
    if flags is None:
        flags = ["--cache-ttl", "1h", "--redis", redis_url]
    daemon = start_server(name, daemon_argv(f"http://{LOOPBACK}:{upstream.port}", *flags))
    try:
        cpu: dict[str, float] = {}

        def start() -> None:
            cpu["start"] = daemon.cpu_s() or 0.0

        def end() -> None:
            cpu["end"] = daemon.cpu_s() or 0.0

        spec = LoadSpec(
            host=LOOPBACK,
            port=daemon.port,
            connections=args.connections,
            duration_s=args.duration,
            warmup_s=args.warmup,
            processes=args.processes,
        )
        load = run_load(spec, generator, on_measure_start=start, on_measure_end=end)
    finally:
        daemon.stop()
        daemon.close()
    requests = max(load.requests, 1)
    return Run(
        name,
        round_no,
        load.requests_per_s,
        load.percentiles_ms.get("p50", float("nan")),
        load.percentiles_ms.get("p99", float("nan")),
        (cpu.get("end", 0.0) - cpu.get("start", 0.0)) / requests * 1e6,
        load.error_count,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    generator: GeneratorName = (
        "wrk" if args.generator == "wrk" or (args.generator == "auto" and wrk_path()) else "builtin"
    )
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("redis-server is not installed: apt-get install redis-server", file=sys.stderr)
        return 2
    program = str(upstream_program())
    size = str(args.size)
    upstream = start_server(
        "upstream", lambda port: [sys.executable, program, "--listen", str(port), "--size", size]
    )
    redis = start_server(
        "redis",
        lambda port: [
            redis_server,
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    )
    runs: list[Run] = []
    try:
        redis_url = f"redis://{LOOPBACK}:{redis.port}/0"
        for round_no in range(args.repeat):
            order = SCENARIOS if round_no % 2 == 0 else tuple(reversed(SCENARIOS))
            for name in order:
                run = run_scenario(args, generator, name, upstream, redis_url, round_no)
                runs.append(run)
                print(
                    f"round {round_no + 1} {name:13s} {run.requests_per_s:9.0f} req/s "
                    f"p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
                    f"{run.cpu_us_per_request:6.1f} us CPU/req  errors {run.errors}",
                    flush=True,
                )
    finally:
        upstream.close()
        redis.close()
    report(args, generator, program, runs)
    return 0 if all(run.errors == 0 for run in runs) else 1


def report(args: argparse.Namespace, generator: str, program: str, runs: list[Run]) -> None:
    print()
    print(
        f"{args.size} B body, {args.connections} connections, "
        f"{args.duration:g} s x {args.repeat} rounds, {generator}"
    )
    print(f"{'scenario':13s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'CPU us/req':>11s} {'errors':>7s}")
    summary: dict[str, Any] = {}
    for name in SCENARIOS:
        mine = [r for r in runs if r.scenario == name]
        row = {
            "requests_per_s": statistics.median(r.requests_per_s for r in mine),
            "p50_ms": statistics.median(r.p50_ms for r in mine),
            "p99_ms": statistics.median(r.p99_ms for r in mine),
            "cpu_us_per_request": statistics.median(r.cpu_us_per_request for r in mine),
            "errors": sum(r.errors for r in mine),
        }
        summary[name] = row
        print(
            f"{name:13s} {row['requests_per_s']:9.0f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
            f"{row['cpu_us_per_request']:11.1f} {row['errors']:7d}"
        )
    print()
    for name in SCENARIOS[1:]:
        speed, cost = [], []
        for round_no in range(args.repeat):
            pair = {r.scenario: r for r in runs if r.round_no == round_no}
            speed.append(pair[name].requests_per_s / pair["forward"].requests_per_s)
            cost.append(pair[name].cpu_us_per_request / pair["forward"].cpu_us_per_request)
        summary[f"{name}/forward"] = {
            "req_per_s": statistics.median(speed),
            "cpu_per_request": statistics.median(cost),
        }
        print(
            f"{name}/forward: {statistics.median(speed):.2f}x req/s, "
            f"{statistics.median(cost):.2f}x CPU per request ({args.repeat} rounds)"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": {
            "size": args.size,
            "connections": args.connections,
            "duration_s": args.duration,
            "repeat": args.repeat,
            "generator": generator,
            "upstream_program": Path(program).name,
            "cpus": os.cpu_count(),
        },
        "summary": summary,
        "runs": [vars(r) for r in runs],
    }
    args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
