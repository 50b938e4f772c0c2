"""Keep-alive pass-through benchmark: the daemon against a direct baseline and a bare forwarder.

One run, three scenarios over the same fast upstream (a canned response of --size bytes):

  direct     load generator -> upstream                         (the generator's and upstream's ceiling)
  daemon     load generator -> resilient-ambassador -> upstream  (the system under test)
  reference  load generator -> minimal_forwarder.py -> upstream  (a bare trio + h11 forwarder)

and prints req/s, p50/p90/p99 latency and errors for each, with the ratios daemon/direct and
daemon/reference. Absolute numbers depend on the machine and on whatever else it runs; the
ratios, measured minutes apart on the same machine, are what targets are written against.
Results also go to bench/results/passthrough.json. See bench/README.md.

Usage: .venv/bin/python bench/passthrough.py [--size 65536] [--quick] [--scenarios daemon,reference]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, final

from loadgen import GeneratorName, LoadError, LoadResult, LoadSpec, run_load, wrk_path
from servers import LOOPBACK, ServerFailed, ServerProcess, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
DEFAULT_JSON = BENCH_DIR / "results" / "passthrough.json"
SCENARIOS = ("direct", "daemon", "reference")
STDERR_TAIL_LINES = 40

QUICK_DURATION_S = 1.0
QUICK_WARMUP_S = 0.25


def shared_dir() -> Path | None:
    """shared/ (with bench-reference/ in it): $AMBASSADOR_SHARED_DIR, else beside the repo."""
    configured = os.environ.get("AMBASSADOR_SHARED_DIR")
    candidate = Path(configured) if configured else REPO_ROOT.parent / "shared"
    return candidate if (candidate / "bench-reference").is_dir() else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Keep-alive pass-through benchmark: direct vs daemon vs reference forwarder.",
    )
    parser.add_argument("--size", type=int, default=1024, help="response body bytes (default 1024)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"measured seconds per scenario (default 5, quick {QUICK_DURATION_S:g})",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help=f"unmeasured seconds first (default 1, quick {QUICK_WARMUP_S:g})",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="load processes (wrk threads), connections split among them (default 2)",
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma list of: " + ", ".join(SCENARIOS)
    )
    parser.add_argument(
        "--generator",
        choices=["auto", "wrk", "builtin"],
        default="auto",
        help="load generator (default auto: wrk when installed, else the built-in one)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="per-request timeout in seconds (default 5)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help="where to write the results (default bench/results/passthrough.json)",
    )
    parser.add_argument(
        "--builtin-upstream",
        action="store_true",
        help="use bench/canned_upstream.py even when shared/bench-reference/ is there",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short run for smoke tests (finishes in well under 15 s)"
    )
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else 5.0
    if args.warmup is None:
        args.warmup = QUICK_WARMUP_S if args.quick else 1.0
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(args.scenario_list) - set(SCENARIOS))
    if unknown or not args.scenario_list:
        parser.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    for name in ("size", "connections", "processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.duration <= 0 or args.warmup < 0 or args.timeout <= 0:
        parser.error("--duration and --timeout must be positive, --warmup not negative")
    return args


@dataclass
class ScenarioResult:
    name: str
    target: str
    status: str = "ok"  # ok | failed | skipped
    reason: str = ""
    load: LoadResult | None = None
    sut_cpu_s: float | None = None  # CPU of the process being loaded, over the measured window
    upstream_cpu_s: float | None = None
    sut_rss_kib: int | None = None  # resident memory of the loaded process at the end of the window
    exit_code: int | None = None  # the forwarder's exit code after SIGTERM (None for direct)
    stderr: str = ""
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "target": self.target, "status": self.status}
        if self.reason:
            doc["reason"] = self.reason
        if self.load is not None:
            load = self.load
            doc.update(
                requests=load.requests,
                measured_s=load.measured_s,
                requests_per_s=round(load.requests_per_s, 1),
                latency_ms={k: _finite_or_none(v) for k, v in load.percentiles_ms.items()},
                errors=load.error_count,
                errors_by_kind=load.errors,
                reconnects_on_connection_close=load.reconnects,
                sut_cpu_s=self.sut_cpu_s,
                sut_cpu_us_per_request=_finite_or_none(self.cpu_us_per_request()),
                upstream_cpu_s=self.upstream_cpu_s,
                sut_rss_kib=self.sut_rss_kib,
            )
        doc.update(exit_code=self.exit_code, stderr_tail=_tail(self.stderr), notes=self.notes)
        return doc

    def cpu_us_per_request(self) -> float:
        if self.sut_cpu_s is None or self.load is None or self.load.requests == 0:
            return math.nan
        return self.sut_cpu_s / self.load.requests * 1e6


@final
class CpuWindow:
    """CPU seconds used by some servers between two points in time."""

    def __init__(self, servers: Sequence[ServerProcess]) -> None:
        self._servers = servers
        self._start: list[float | None] = []
        self.used_s: list[float | None] = [None] * len(servers)
        self.rss_kib_after: list[int | None] = [None] * len(servers)

    def start(self) -> None:
        self._start = [s.cpu_s() for s in self._servers]

    def stop(self) -> None:
        for i, server in enumerate(self._servers):
            before, after = self._start[i] if self._start else None, server.cpu_s()
            self.used_s[i] = None if before is None or after is None else round(after - before, 3)
            self.rss_kib_after[i] = server.rss_kib()


def _finite_or_none(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> list[str]:
    return text.splitlines()[-lines:]


def _child_env() -> dict[str, str]:
    """The environment for servers: this checkout's package first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@final
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.shared = None if args.builtin_upstream else shared_dir()
        self.reference_dir = self.shared / "bench-reference" if self.shared else None
        self.generator: GeneratorName = (
            "wrk" if args.generator == "wrk" or (args.generator == "auto" and wrk_path()) else "builtin"
        )
        if self.reference_dir is not None:
            self.upstream_program = self.reference_dir / "canned_upstream.py"
        else:
            self.upstream_program = BENCH_DIR / "canned_upstream.py"

    def spec(self, port: int) -> LoadSpec:
        a = self.args
        return LoadSpec(
            host=LOOPBACK,
            port=port,
            connections=a.connections,
            duration_s=a.duration,
            warmup_s=a.warmup,
            processes=a.processes,
            timeout_s=a.timeout,
        )

    def start_upstream(self) -> ServerProcess:
        program, size = str(self.upstream_program), str(self.args.size)
        return start_server(
            "upstream", lambda port: [sys.executable, program, "--listen", str(port), "--size", size]
        )

    def forwarder_argv(self, name: str, upstream_port: int) -> Callable[[int], list[str]] | None:
        if name == "daemon":
            upstream_url = f"http://{LOOPBACK}:{upstream_port}"
            return lambda port: [
                sys.executable,
                "-m",
                "resilient_ambassador",
                "run",
                "--listen",
                f"{LOOPBACK}:{port}",
                "--upstream",
                upstream_url,
                "--log-level",
                "warning",
            ]
        if self.reference_dir is None:
            return None
        program = str(self.reference_dir / "minimal_forwarder.py")
        return lambda port: [
            sys.executable,
            program,
            "--listen",
            str(port),
            "--upstream",
            f"{LOOPBACK}:{upstream_port}",
        ]

    def run_scenario(self, name: str, upstream: ServerProcess) -> ScenarioResult:
        if name == "direct":
            return self._load(ScenarioResult(name, f"{self.upstream_program.name}"), upstream, upstream)
        argv_for_port = self.forwarder_argv(name, upstream.port)
        if argv_for_port is None:
            return ScenarioResult(
                name, "minimal_forwarder.py", status="skipped", reason="shared/bench-reference/ not found"
            )
        target = "resilient_ambassador" if name == "daemon" else "minimal_forwarder.py"
        result = ScenarioResult(name, target)
        try:
            forwarder = start_server(name, argv_for_port)
        except ServerFailed as exc:
            result.status, result.reason = "failed", str(exc).splitlines()[0]
            result.stderr = str(exc)
            return result
        try:
            self._load(result, forwarder, upstream)
        finally:
            result.exit_code = forwarder.stop()
            result.stderr = forwarder.stderr_text()
            forwarder.close()
        # The daemon promises a clean exit on SIGTERM; the reference forwarder has no handler.
        if name == "daemon" and result.exit_code != 0:
            result.notes.append(f"{name} exited {result.exit_code} after SIGTERM (expected 0)")
        if result.stderr.strip():
            result.notes.append(f"{name} wrote {len(result.stderr.splitlines())} lines to stderr")
        return result

    def _load(self, result: ScenarioResult, sut: ServerProcess, upstream: ServerProcess) -> ScenarioResult:
        servers = [sut] if sut is upstream else [sut, upstream]
        window = CpuWindow(servers)
        try:
            result.load = run_load(self.spec(sut.port), self.generator, window.start, window.stop)
        except LoadError as exc:
            result.status, result.reason = "failed", str(exc)
            return result
        result.sut_cpu_s = window.used_s[0]
        result.upstream_cpu_s = window.used_s[-1]
        result.sut_rss_kib = window.rss_kib_after[0]
        if not sut.alive():
            result.status, result.reason = "failed", f"{sut.name} died under load"
        elif not upstream.alive():
            result.status, result.reason = "failed", "upstream died under load"
        return result


def ratios(daemon: ScenarioResult, other: ScenarioResult) -> dict[str, float | None] | None:
    if daemon.load is None or other.load is None or daemon.status != "ok" or other.status != "ok":
        return None
    d, o = daemon.load, other.load
    doc: dict[str, float | None] = {
        "requests_per_s": round(d.requests_per_s / o.requests_per_s, 3) if o.requests_per_s else None
    }
    for key in ("p50", "p90", "p99"):
        mine, theirs = d.percentiles_ms.get(key, math.nan), o.percentiles_ms.get(key, math.nan)
        value = mine / theirs if theirs else math.nan
        doc[f"{key}_latency"] = round(value, 3) if math.isfinite(value) else None
    return doc


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(results: Sequence[ScenarioResult], ratio_rows: dict[str, dict[str, float | None]]) -> str:
    header = ("scenario", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "cpu us/req", "status")
    rows: list[tuple[str, ...]] = [header]
    for r in results:
        load = r.load
        if load is None:
            rows.append((r.name, "-", "-", "-", "-", "-", "-", f"{r.status}: {r.reason}"))
            continue
        p = load.percentiles_ms
        rows.append(
            (
                r.name,
                _fmt(load.requests_per_s, 0),
                _fmt(p.get("p50"), 2),
                _fmt(p.get("p90"), 2),
                _fmt(p.get("p99"), 2),
                str(load.error_count),
                _fmt(r.cpu_us_per_request(), 0),
                r.status if r.status == "ok" else f"{r.status}: {r.reason}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:], strict=True)]
        lines.append("  ".join([*cells, row[-1]]))
    if ratio_rows:
        lines.append("")
        width = max(len(name) for name in ratio_rows)
        for name, doc in ratio_rows.items():
            lines.append(
                f"{name.ljust(width)}  req/s {_fmt_ratio(doc['requests_per_s'])}"
                f"  p50 {_fmt_ratio(doc['p50_latency'])}"
                f"  p90 {_fmt_ratio(doc['p90_latency'])}"
                f"  p99 {_fmt_ratio(doc['p99_latency'])}"
            )
    return "\n".join(lines)


def _git_describe() -> str | None:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    os.environ.update(_child_env())
    bench = Bench(args)
    started = time.monotonic()
    meta: dict[str, Any] = {
        "benchmark": "passthrough",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": _git_describe(),
        "size_bytes": args.size,
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "processes": args.processes,
        "generator": bench.generator,
        "upstream_program": str(bench.upstream_program),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    print(
        f"passthrough: {args.size} B body, {args.connections} keep-alive connections, "
        f"{args.warmup:g} s warm-up + {args.duration:g} s per scenario, "
        f"generator {bench.generator} x{min(args.processes, args.connections)}, "
        f"upstream {bench.upstream_program}",
        flush=True,
    )
    busy = meta["loadavg_before"] is not None and meta["loadavg_before"][0] > (os.cpu_count() or 1)
    if busy:
        print(f"  warning: load average {meta['loadavg_before'][0]} before the run: numbers will be noisy")
    results: list[ScenarioResult] = []
    with contextlib.ExitStack() as stack:
        upstream = bench.start_upstream()
        stack.callback(upstream.close)
        for name in args.scenario_list:
            print(f"  running {name} ...", flush=True)
            results.append(bench.run_scenario(name, upstream))
        upstream_exit = upstream.stop()
        upstream_stderr = upstream.stderr_text()

    by_name = {r.name: r for r in results}
    ratio_rows: dict[str, dict[str, float | None]] = {}
    if "daemon" in by_name:
        for other in ("direct", "reference"):
            if other in by_name and (doc := ratios(by_name["daemon"], by_name[other])) is not None:
                ratio_rows[f"daemon/{other}"] = doc

    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_after"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    document = {
        "meta": meta,
        "scenarios": [r.as_json() for r in results],
        "ratios": ratio_rows,
        "upstream": {"exit_code": upstream_exit, "stderr_tail": _tail(upstream_stderr)},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")

    print()
    print(render(results, ratio_rows))
    problems = [f"{r.name}: {note}" for r in results for note in r.notes]
    problems += [
        f"{r.name}: {r.load.error_count} errors {r.load.errors}"
        for r in results
        if r.load and r.load.error_count
    ]
    problems += [f"{r.name}: {r.status}: {r.reason}" for r in results if r.status == "failed"]
    for r in results:
        if r.stderr.strip():
            problems.append(f"{r.name} stderr (last lines):\n    " + "\n    ".join(_tail(r.stderr, 10)))
    print()
    for problem in problems:
        print(f"! {problem}")
    print(f"results: {args.json}  ({meta['elapsed_s']} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the finally blocks have already stopped every server
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
