"""Rate-limit benchmark: decision cost, pass-through cost, and accuracy across processes.

Three parts (--parts, default all three):

  decision     per-decision cost in-process: MemoryBuckets vs RedisBuckets (one EVALSHA through
               the RedisRunner's worker threads), sequential and with 64 concurrent callers.
  passthrough  the daemon with no limit, a generous memory limit and a generous Redis limit
               (--rate-limit 1000000/s [--redis URL]), loaded one after the other in alternating
               rounds: req/s, p50/p99, daemon CPU per request. Then the paired A/B of
               passthrough.py: each limited daemon and an unlimited one under load at the same
               time, pinned to one shared core, for the cost as CPU per request (sequential
               runs on a shared VM scatter by tens of percent; the paired ratio holds).
  accuracy     4 daemon processes (`python -m resilient_ambassador run --rate-limit 50/s --redis
               URL`), hammered together; after a warm-up that empties the shared bucket, admitted
               requests are counted from each daemon's /stats over exactly --accuracy-window
               seconds (default 10): the issue's target is 500 +/- 5%.

A private redis-server (Debian's `redis-server`) is started on a free port for the Redis parts.
Results are printed and written to bench/results/ratelimit.json. See bench/README.md.

Usage: .venv/bin/python bench/ratelimit.py [--quick] [--parts decision,accuracy]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import secrets
import shutil
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import trio
from loadgen import LoadResult, LoadSpec, run_load
from passthrough import _pinned, split_cpus
from servers import LOOPBACK, ServerProcess, daemon_argv, free_port, start_server

from resilient_ambassador.core.ratelimit import Limit
from resilient_ambassador.stores.ratelimit import Buckets, MemoryBuckets, RedisBuckets
from resilient_ambassador.stores.redis_client import RedisRunner

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "ratelimit.json"
PARTS = ("decision", "passthrough", "accuracy")
GENEROUS = "1000000/s"
ROUTE = "main-route-0"  # the one-liner's route name
ACCURACY_RATE = 50
ACCURACY_DAEMONS = 4
ACCURACY_TOLERANCE = 0.05


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="short runs: a smoke test, not a measurement")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per pass-through run")
    p.add_argument("--rounds", type=int, default=3, help="pass-through rounds (sequential and paired)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--accuracy-window", type=float, default=10.0, help="seconds counted in the accuracy run")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    args.part_list = [x for x in args.parts.split(",") if x]
    unknown = set(args.part_list) - set(PARTS)
    if unknown:
        p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if args.quick:
        args.duration, args.rounds, args.accuracy_window = 1.0, 1, 3.0
    return args


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    program = shutil.which("redis-server")
    if program is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    server = start_server(
        "redis",
        lambda port: [program, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"],
        cpus=split_cpus()[1],  # off the core the paired daemons share
    )
    try:
        yield f"redis://{LOOPBACK}:{server.port}/0"
    finally:
        server.close()


def start_upstream() -> ServerProcess:
    program = str(REPO_ROOT / "bench" / "canned_upstream.py")
    return start_server("upstream", lambda port: [sys.executable, program, "--listen", str(port)])


# -- part 1: decision cost -------------------------------------------------------------------


async def _time_decisions(buckets: Buckets, n: int, concurrency: int) -> float:
    """Seconds per decision over `n` decisions made by `concurrency` tasks."""
    limit = Limit(1e9, 1.0, 1_000_000)  # never refuses: every decision does the full work
    key = secrets.token_hex(16)
    per_task = n // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            await buckets.acquire(key, limit, 0.0)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return (time.perf_counter() - started) / (per_task * concurrency)


async def _decision_part(redis_url: str, quick: bool) -> dict[str, Any]:
    scale = 5 if quick else 1
    out: dict[str, Any] = {}
    out["memory_us"] = await _time_decisions(MemoryBuckets(), 200_000 // scale, 1) * 1e6
    runner = RedisRunner.from_url(redis_url, timeout_s=1.0)
    try:
        redis_buckets = RedisBuckets(runner, key_prefix=f"bench:{secrets.token_hex(4)}:")
        await _time_decisions(redis_buckets, 200, 1)  # connect, load the script
        out["redis_sequential_us"] = await _time_decisions(redis_buckets, 5_000 // scale, 1) * 1e6
        out["redis_concurrent_us"] = await _time_decisions(redis_buckets, 20_000 // scale, 64) * 1e6
        out["redis_fallbacks"] = redis_buckets.fallbacks
    finally:
        await runner.aclose()
    return out


def decision_part(redis_url: str, quick: bool) -> dict[str, Any]:
    result: dict[str, Any] = trio.run(_decision_part, redis_url, quick)
    print("decision cost (one token, in-process)")
    print(f"  memory                      {result['memory_us']:8.2f} us/decision")
    print(f"  redis, one at a time        {result['redis_sequential_us']:8.2f} us/decision (round trip)")
    conc = result["redis_concurrent_us"]
    print(f"  redis, 64 callers           {conc:8.2f} us/decision ({1e6 / conc:,.0f} decisions/s)")
    return result


# -- part 2: pass-through ----------------------------------------------------------------------


def _load(
    server: ServerProcess, args: argparse.Namespace, ready: Callable[[], None] | None = None
) -> dict[str, Any]:
    spec = LoadSpec(LOOPBACK, server.port, args.connections, args.duration, 1.0, processes=1)
    cpu: list[float | None] = []
    result = run_load(
        spec,
        "builtin",
        on_measure_start=lambda: cpu.append(server.cpu_s()),
        on_measure_end=lambda: cpu.append(server.cpu_s()),
        on_ready=ready,
    )
    cpu_us = math.nan
    if len(cpu) == 2 and cpu[0] is not None and cpu[1] is not None and result.requests:
        cpu_us = (cpu[1] - cpu[0]) / result.requests * 1e6
    return {
        "requests_per_s": result.requests_per_s,
        "p50_ms": result.percentiles_ms["p50"],
        "p99_ms": result.percentiles_ms["p99"],
        "cpu_us_per_request": cpu_us,
        "errors": result.errors,
    }


def passthrough_part(redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    scenarios: dict[str, tuple[str, ...]] = {
        "no-limit": (),
        "memory-limit": ("--rate-limit", GENEROUS),
        "redis-limit": ("--rate-limit", GENEROUS, "--redis", redis_url),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in scenarios}
    upstream = start_upstream()
    try:
        for round_no in range(args.rounds):
            names = list(scenarios) if round_no % 2 == 0 else list(reversed(scenarios))
            for name in names:
                daemon = start_server(
                    name, daemon_argv(f"http://{LOOPBACK}:{upstream.port}", *scenarios[name])
                )
                try:
                    runs[name].append(_load(daemon, args))
                finally:
                    daemon.close()
    finally:
        upstream.close()
    summary: dict[str, Any] = {}
    print(
        f"pass-through, {args.connections} connections, {args.duration:g} s x {args.rounds} rounds (medians)"
    )
    print(f"  {'scenario':<14}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'cpu us/req':>12}{'errors':>8}")
    for name, results in runs.items():
        med = {
            k: statistics.median(r[k] for r in results)
            for k in ("requests_per_s", "p50_ms", "p99_ms", "cpu_us_per_request")
        }
        errors = sum(sum(r["errors"].values()) for r in results)
        summary[name] = {**med, "errors": errors, "runs": results}
        print(
            f"  {name:<14}{med['requests_per_s']:8.0f}{med['p50_ms']:9.2f}{med['p99_ms']:9.2f}"
            f"{med['cpu_us_per_request']:12.0f}{errors:8d}"
        )
    base = summary["no-limit"]["cpu_us_per_request"]
    for name in ("memory-limit", "redis-limit"):
        summary[name]["cpu_ratio_vs_no_limit"] = summary[name]["cpu_us_per_request"] / base
        summary[name]["rps_ratio_vs_no_limit"] = (
            summary[name]["requests_per_s"] / summary["no-limit"]["requests_per_s"]
        )
        print(
            f"  {name} / no-limit: req/s {summary[name]['rps_ratio_vs_no_limit']:.2f}x, "
            f"cpu/req {summary[name]['cpu_ratio_vs_no_limit']:.2f}x"
        )
    return summary


def _load_together(servers: Sequence[ServerProcess], args: argparse.Namespace) -> list[dict[str, Any]]:
    """`_load` on every server at once (one thread each); the warm-ups start together."""
    together = threading.Barrier(len(servers))
    loads: list[dict[str, Any]] = [{} for _ in servers]

    def load(i: int) -> None:
        loads[i] = _load(servers[i], args, lambda: _wait(together))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(servers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return loads


def paired_part(redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Each limited daemon against an unlimited one, loaded together on one shared core."""
    daemon_cpus, other_cpus = split_cpus()
    limited: dict[str, tuple[str, ...]] = {
        "memory-limit": ("--rate-limit", GENEROUS),
        "redis-limit": ("--rate-limit", GENEROUS, "--redis", redis_url),
    }
    out: dict[str, Any] = {"cpus": None if daemon_cpus is None else sorted(daemon_cpus)}
    upstream = start_server(
        "upstream",
        lambda port: [sys.executable, str(REPO_ROOT / "bench" / "canned_upstream.py"), "--listen", str(port)],
        cpus=other_cpus,
    )
    print(f"paired A/B, both daemons on cpu {out['cpus']}, {args.duration:g} s x {args.rounds} rounds")
    try:
        for name, flags in limited.items():
            rounds: list[dict[str, Any]] = []
            for _ in range(args.rounds):
                pair = [
                    start_server(
                        n,
                        daemon_argv(f"http://{LOOPBACK}:{upstream.port}", *f),
                        cpus=daemon_cpus,
                    )
                    for n, f in (("no-limit", ()), (name, flags))
                ]
                try:
                    with _pinned(other_cpus):  # the load threads, and the generators they start
                        loads = _load_together(pair, args)
                finally:
                    for daemon in pair:
                        daemon.close()
                ratio = loads[1]["cpu_us_per_request"] / loads[0]["cpu_us_per_request"]
                rounds.append(
                    {"no_limit": loads[0], "limited": loads[1], "cpu_ratio": ratio, "cost": 1 - 1 / ratio}
                )
            cost = statistics.median(r["cost"] for r in rounds)
            ratio = statistics.median(r["cpu_ratio"] for r in rounds)
            per_round = ", ".join(f"{r['cost']:.1%}" for r in rounds)
            print(
                f"  {name} vs no-limit: cpu/req {ratio:.2f}x, "
                f"cost {cost:.1%} of req/s per CPU-s (rounds: {per_round})"
            )
            out[name] = {"cpu_ratio": ratio, "cost": cost, "rounds": rounds}
    finally:
        upstream.close()
    return out


# -- part 3: accuracy ----------------------------------------------------------------------------


def _admitted(admin_port: int) -> tuple[int, int, int]:
    """(admitted, rejected, decisions made without Redis) so far, from the daemon's /stats."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{admin_port}/stats", timeout=5) as reply:
        route = json.loads(reply.read())["rate_limits"]["routes"][ROUTE]
    return int(route["admitted"]), int(route["rejected"]), int(route["backend_fallbacks"])


def _wait(barrier: threading.Barrier) -> None:
    barrier.wait(60)


def accuracy_part(redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    window_s = args.accuracy_window
    warmup_s = 2.0  # > 1 s: the shared bucket's burst (one second's worth) is spent before counting
    upstream = start_upstream()
    daemons: list[tuple[ServerProcess, int]] = []
    try:
        for i in range(ACCURACY_DAEMONS):
            admin = free_port()
            flags = (
                "--rate-limit",
                f"{ACCURACY_RATE}/s",
                "--redis",
                redis_url,
            )
            argv = daemon_argv(f"http://{LOOPBACK}:{upstream.port}", *flags, admin=f"{LOOPBACK}:{admin}")
            daemons.append((start_server(f"daemon-{i}", argv), admin))
        measuring = threading.Barrier(ACCURACY_DAEMONS + 1)
        results: list[LoadResult] = []

        def hammer(daemon: ServerProcess) -> None:
            # Longer than the counted window on both sides, so the load covers all of it.
            spec = LoadSpec(LOOPBACK, daemon.port, 8, window_s + 2.0, warmup_s, processes=1)
            results.append(run_load(spec, "builtin", on_measure_start=lambda: _wait(measuring)))

        threads = [threading.Thread(target=hammer, args=(d,)) for d, _ in daemons]
        for thread in threads:
            thread.start()
        measuring.wait(60)
        time.sleep(0.5)
        before = [_admitted(admin) for _, admin in daemons]
        started = time.monotonic()
        time.sleep(window_s)
        after = [_admitted(admin) for _, admin in daemons]
        counted_s = time.monotonic() - started
        for thread in threads:
            thread.join()
        totals = [_admitted(admin) for _, admin in daemons]
    finally:
        for daemon, _ in daemons:
            daemon.close()
        upstream.close()
    per_daemon = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    admitted = sum(per_daemon)
    rejected = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    fallbacks = sum(a[2] - b[2] for a, b in zip(after, before, strict=True))
    expected = ACCURACY_RATE * window_s
    error = admitted / expected - 1
    within = abs(error) <= ACCURACY_TOLERANCE
    print(
        f"accuracy: {ACCURACY_DAEMONS} daemons sharing one Redis limit of {ACCURACY_RATE}/s, "
        f"{window_s:g} s counted"
    )
    print(
        f"  admitted {admitted} (per daemon {per_daemon}), expected {expected:.0f}: "
        f"{error:+.1%} ({'within' if within else 'OUTSIDE'} +/-{ACCURACY_TOLERANCE:.0%}); "
        f"refused {rejected} in the window ({rejected / counted_s:,.0f}/s offered over the limit); "
        f"decisions without Redis (local fallback): {fallbacks}"
    )
    offered = sum(r.requests for r in results)
    print(
        f"  whole run incl. the initial burst: admitted {sum(t[0] for t in totals)}, "
        f"load generators completed {offered}"
    )
    return {
        "daemons": ACCURACY_DAEMONS,
        "rate_per_s": ACCURACY_RATE,
        "window_s": window_s,
        "counted_s": counted_s,
        "admitted": admitted,
        "admitted_per_daemon": per_daemon,
        "expected": expected,
        "error": error,
        "within_tolerance": within,
        "rejected_in_window": rejected,
        "backend_fallbacks_in_window": fallbacks,
        "admitted_whole_run": sum(t[0] for t in totals),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(_child_env())
    doc: dict[str, Any] = {
        "benchmark": "ratelimit",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "loadavg_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "quick": args.quick,
    }
    with private_redis() as redis_url:
        if "decision" in args.part_list:
            doc["decision"] = decision_part(redis_url, args.quick)
        if "passthrough" in args.part_list:
            doc["passthrough"] = passthrough_part(redis_url, args)
            doc["paired"] = paired_part(redis_url, args)
        if "accuracy" in args.part_list:
            doc["accuracy"] = accuracy_part(redis_url, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {args.json}")
    accuracy = doc.get("accuracy")
    return 0 if accuracy is None or accuracy["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
