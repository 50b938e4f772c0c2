"""Keep-alive pass-through benchmark: the daemon against a direct baseline and a bare forwarder.

One run, four scenarios over the same fast upstream (a canned response of --size bytes):

  direct       load generator -> upstream                         (the generator's and upstream's ceiling)
  daemon       load generator -> resilient-ambassador -> upstream  (the system under test, as deployed:
                                                                    retry and circuit breaker on)
  daemon-bare  the same with --retries 0 --breaker-failures 0     (no policy stages: what they cost)
  reference    load generator -> minimal_forwarder.py -> upstream  (a bare trio + h11 forwarder)

Every scenario runs --repeat times (default 3), in rounds whose order alternates (forward, then
reversed), so daemon and daemon-bare always run back to back and each goes first as often as
the other. The table shows each scenario's median over its runs; each ratio is the median of
its per-round ratios. It prints req/s, p50/p90/p99 latency, errors and CPU per request, and
the ratios daemon/direct, daemon/reference and daemon/daemon-bare.

Then the policy A/B (--concurrent-rounds, default 3): daemon and daemon-bare loaded at the same
time, both pinned to one shared core. On a shared 2-core VM the CPU's speed moves by tens of
percent between runs, so sequential runs cannot resolve a 5% difference; two daemons sharing a
core at the same moment see the same speed, and their ratio holds within a point or two. The policy cost
(1 - req/s ratio, against its 5% target) is printed from both, the verdict from the concurrent
one. Absolute numbers depend on the machine and on whatever else it runs; the ratios, measured
minutes apart on the same machine, are what targets are written against. Results also go to
bench/results/passthrough.json. See bench/README.md.

Usage: .venv/bin/python bench/passthrough.py [--size 65536] [--quick] [--repeat 5]
       [--concurrent-rounds 5] [--scenarios daemon,daemon-bare]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, final

from harness import run_order
from loadgen import GeneratorName, LoadError, LoadResult, LoadSpec, run_load, wrk_path
from servers import LOOPBACK, ServerFailed, ServerProcess, can_pin, daemon_argv, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
DEFAULT_JSON = BENCH_DIR / "results" / "passthrough.json"
SCENARIOS = ("direct", "daemon", "daemon-bare", "reference")
# The daemon's flags per scenario, after --listen/--upstream/--log-level: `daemon` runs with the
# defaults (retry and circuit breaker on), `daemon-bare` with both policy stages off.
DAEMON_FLAGS: dict[str, tuple[str, ...]] = {
    "daemon": (),
    "daemon-bare": ("--retries", "0", "--breaker-failures", "0"),
}
# Ratio lines, in the order printed: (numerator, denominator) scenarios.
RATIO_PAIRS = (("daemon", "direct"), ("daemon", "reference"), ("daemon", "daemon-bare"))
POLICY_PAIR = ("daemon", "daemon-bare")
# The budget: retry + breaker may cost at most this share of pass-through throughput.
POLICY_COST_TARGET = 0.05
STDERR_TAIL_LINES = 40

DEFAULT_REPEAT = 3
# How long concurrent loads wait for each other's generators to be set up (the built-in one
# gives its processes 30 s to report ready).
READY_WAIT_S = 60.0
DEFAULT_CONCURRENT_ROUNDS = 3
QUICK_DURATION_S = 1.0
QUICK_WARMUP_S = 0.25


def shared_dir() -> Path | None:
    """shared/ (with bench-reference/ in it): $AMBASSADOR_SHARED_DIR, else beside the repo."""
    configured = os.environ.get("AMBASSADOR_SHARED_DIR")
    candidate = Path(configured) if configured else REPO_ROOT.parent / "shared"
    return candidate if (candidate / "bench-reference").is_dir() else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Keep-alive pass-through benchmark: direct vs daemon (policies on and off) "
        "vs reference forwarder.",
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
        "--repeat",
        type=int,
        default=None,
        help=f"rounds: every scenario runs this many times, in alternating order; medians are "
        f"reported (default {DEFAULT_REPEAT}, quick 1)",
    )
    parser.add_argument(
        "--concurrent-rounds",
        type=int,
        default=None,
        help="rounds of the policy A/B: daemon and daemon-bare loaded at the same time on one "
        f"shared core (default {DEFAULT_CONCURRENT_ROUNDS}, quick 1, 0: skip; needs both scenarios)",
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
    parser.add_argument("--quick", action="store_true", help="short run for smoke tests (about 15 s)")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else 5.0
    if args.warmup is None:
        args.warmup = QUICK_WARMUP_S if args.quick else 1.0
    if args.repeat is None:
        args.repeat = 1 if args.quick else DEFAULT_REPEAT
    if args.concurrent_rounds is None:
        args.concurrent_rounds = 1 if args.quick else DEFAULT_CONCURRENT_ROUNDS
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(args.scenario_list) - set(SCENARIOS))
    if unknown or not args.scenario_list:
        parser.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    for name in ("size", "connections", "processes", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.concurrent_rounds < 0:
        parser.error("--concurrent-rounds must not be negative")
    if args.duration <= 0 or args.warmup < 0 or args.timeout <= 0:
        parser.error("--duration and --timeout must be positive, --warmup not negative")
    return args


@dataclass
class ScenarioResult:
    """One run of one scenario."""

    name: str
    target: str
    round: int = 1  # which round (of --repeat, or of --concurrent-rounds), from 1
    status: str = "ok"  # ok | failed | skipped
    reason: str = ""
    load: LoadResult | None = None
    sut_cpu_s: float | None = None  # CPU of the process being loaded, over the measured window
    upstream_cpu_s: float | None = None
    sut_rss_kib: int | None = None  # resident memory of the loaded process at the end of the window
    exit_code: int | None = None  # the forwarder's exit code after SIGTERM (None for direct)
    stderr: str = ""
    notes: list[str] = field(default_factory=list)
    loadavg_1m: float | None = None  # the 1-minute load average when the run started
    # "sequential": alone on the machine; "concurrent": at the same time as its policy pair,
    # on one shared core (see Bench.run_concurrent_pair).
    phase: str = "sequential"

    @property
    def label(self) -> str:
        return f"{self.name} ({'' if self.phase == 'sequential' else self.phase + ' '}round {self.round})"

    @property
    def measured(self) -> bool:
        return self.status == "ok" and self.load is not None

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "phase": self.phase,
            "round": self.round,
            "target": self.target,
            "status": self.status,
            "loadavg_1m": self.loadavg_1m,
        }
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


def _median(values: Sequence[float | None]) -> float:
    """The median of the finite values, NaN when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


@dataclass
class ScenarioSummary:
    """A scenario over all its runs: medians of the runs that measured cleanly."""

    name: str
    runs: list[ScenarioResult]

    @property
    def measured(self) -> list[ScenarioResult]:
        return [r for r in self.runs if r.measured]

    @property
    def status(self) -> str:
        if all(r.status == "skipped" for r in self.runs):
            return "skipped"
        return "ok" if all(r.status == "ok" for r in self.runs) else "failed"

    @property
    def reason(self) -> str:
        return next((f"{r.reason} (round {r.round})" for r in self.runs if r.status != "ok"), "")

    def requests_per_s(self) -> float:
        return _median([r.load.requests_per_s for r in self.measured if r.load is not None])

    def percentile_ms(self, key: str) -> float:
        return _median([r.load.percentiles_ms.get(key) for r in self.measured if r.load is not None])

    def cpu_us_per_request(self) -> float:
        return _median([r.cpu_us_per_request() for r in self.measured])

    def error_count(self) -> int:
        return sum(r.load.error_count for r in self.runs if r.load is not None)

    def spread(self) -> float:
        """(max - min) / median of req/s over the measured runs: how noisy this scenario was."""
        rates = [r.load.requests_per_s for r in self.measured if r.load is not None]
        middle = _median(rates)
        if len(rates) < 2 or not middle:
            return math.nan
        return (max(rates) - min(rates)) / middle

    def as_json(self) -> dict[str, Any]:
        errors_by_kind: dict[str, int] = {}
        for r in self.runs:
            for kind, n in (r.load.errors if r.load is not None else {}).items():
                errors_by_kind[kind] = errors_by_kind.get(kind, 0) + n
        return {
            "name": self.name,
            "target": self.runs[0].target if self.runs else None,
            "status": self.status,
            "reason": self.reason or None,
            "runs": len(self.runs),
            "measured_runs": len(self.measured),
            "requests_per_s": _finite_or_none(self.requests_per_s()),
            "requests_per_s_runs": [
                round(r.load.requests_per_s, 1) if r.load is not None else None for r in self.runs
            ],
            "requests_per_s_spread": _finite_or_none(self.spread()),
            "latency_ms": {k: _finite_or_none(self.percentile_ms(k)) for k in ("p50", "p90", "p99", "max")},
            "errors": self.error_count(),
            "errors_by_kind": errors_by_kind,
            "sut_cpu_us_per_request": _finite_or_none(self.cpu_us_per_request()),
            "run_details": [r.as_json() for r in self.runs],
        }


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
        if name in DAEMON_FLAGS:
            # An ephemeral admin port (the default): two daemons run at once in the paired rounds.
            return daemon_argv(f"http://{LOOPBACK}:{upstream_port}", *DAEMON_FLAGS[name])
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

    def run_scenario(self, name: str, upstream: ServerProcess, round_no: int) -> ScenarioResult:
        loadavg = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        if name == "direct":
            result = ScenarioResult(name, self.upstream_program.name, round_no, loadavg_1m=loadavg)
            return self._load(result, upstream, upstream)
        argv_for_port = self.forwarder_argv(name, upstream.port)
        if argv_for_port is None:
            return ScenarioResult(
                name,
                "minimal_forwarder.py",
                round_no,
                status="skipped",
                reason="shared/bench-reference/ not found",
            )
        result = ScenarioResult(name, _target(name), round_no, loadavg_1m=loadavg)
        forwarder = self._start_forwarder(result, argv_for_port)
        if forwarder is None:
            return result
        try:
            self._load(result, forwarder, upstream)
        finally:
            self._stop_forwarder(result, forwarder)
        return result

    def run_concurrent_pair(self, upstream: ServerProcess, round_no: int) -> list[ScenarioResult]:
        """The policy A/B: daemon and daemon-bare, each under its own load, at the same time and
        pinned to the same core (the generators and the upstream to the other cores). The
        kernel shares that core equally between the two, and whatever the machine's speed
        does during the window (it varies by tens of percent on a shared VM, from one run to
        the next and within one) it does to both: their ratio is steady where sequential runs
        are not. Absolute figures are not comparable with the sequential ones (half a core
        each)."""
        daemon_cpus, other_cpus = split_cpus()
        loadavg = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        results = [
            ScenarioResult(name, _target(name), round_no, loadavg_1m=loadavg, phase="concurrent")
            for name in POLICY_PAIR
        ]
        started: list[tuple[ScenarioResult, ServerProcess]] = []
        try:
            for result in results:
                argv_for_port = self.forwarder_argv(result.name, upstream.port)
                assert argv_for_port is not None  # both are daemons
                forwarder = self._start_forwarder(result, argv_for_port, daemon_cpus)
                if forwarder is None:
                    break
                started.append((result, forwarder))
            if len(started) == len(results):
                with _pinned(other_cpus):  # the load threads, and the generators they start
                    self._load_concurrently(started, upstream)
        finally:
            for result, forwarder in started:
                self._stop_forwarder(result, forwarder)
        for result in results:
            if result.status == "ok" and result.load is None:
                result.status, result.reason = "skipped", "the other daemon did not start"
        return results

    def _start_forwarder(
        self,
        result: ScenarioResult,
        argv_for_port: Callable[[int], list[str]],
        cpus: set[int] | None = None,
    ) -> ServerProcess | None:
        try:
            return start_server(result.name, argv_for_port, cpus=cpus)
        except ServerFailed as exc:
            result.status, result.reason = "failed", str(exc).splitlines()[0]
            result.stderr = str(exc)
            return None

    def _stop_forwarder(self, result: ScenarioResult, forwarder: ServerProcess) -> None:
        try:
            result.exit_code = forwarder.stop()
            result.stderr = forwarder.stderr_text()
        finally:
            forwarder.close()
        # The daemon promises a clean exit on SIGTERM; the reference forwarder has no handler.
        if result.name in DAEMON_FLAGS and result.exit_code != 0:
            result.notes.append(f"exited {result.exit_code} after SIGTERM (expected 0)")
        if result.stderr.strip():
            result.notes.append(f"wrote {len(result.stderr.splitlines())} lines to stderr")

    def _load_concurrently(
        self, pairs: Sequence[tuple[ScenarioResult, ServerProcess]], upstream: ServerProcess
    ) -> None:
        """`_load` for each (result, server) at once, one thread each (the generators are
        subprocesses: the threads only wait). The warm-ups, and so the measured windows, start
        together: each load waits for the others once its generator is set up."""
        failures: list[BaseException] = []
        together = threading.Barrier(len(pairs))

        def load(result: ScenarioResult, sut: ServerProcess) -> None:
            try:
                self._load(result, sut, upstream, together)
            except BaseException as exc:  # re-raised below, in the main thread
                failures.append(exc)
            finally:
                together.abort()  # a load that failed before the barrier must not hold the others

        threads = [
            threading.Thread(target=load, args=pair, name=f"load {pair[0].name}", daemon=True)
            for pair in pairs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]

    def _load(
        self,
        result: ScenarioResult,
        sut: ServerProcess,
        upstream: ServerProcess,
        together: threading.Barrier | None = None,
    ) -> ScenarioResult:
        servers = [sut] if sut is upstream else [sut, upstream]
        window = CpuWindow(servers)

        def ready() -> None:
            if together is not None:
                # Broken: another load failed; this one runs alone, and the round fails anyway.
                with contextlib.suppress(threading.BrokenBarrierError):
                    together.wait(READY_WAIT_S)

        try:
            result.load = run_load(self.spec(sut.port), self.generator, window.start, window.stop, ready)
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


def _target(name: str) -> str:
    if name in DAEMON_FLAGS:
        return " ".join(("resilient_ambassador", *DAEMON_FLAGS[name]))
    return "minimal_forwarder.py"


def split_cpus() -> tuple[set[int] | None, set[int] | None]:
    """(the core both policy daemons share, the cores for everything else), or (None, None)
    where processes cannot be pinned. With a single core, everything shares it."""
    if not can_pin():
        return None, None
    allowed = sorted(os.sched_getaffinity(0))
    return {allowed[-1]}, set(allowed[:-1]) or {allowed[-1]}


@contextlib.contextmanager
def _pinned(cpus: set[int] | None) -> Iterator[None]:
    """Pin the calling thread (and so the threads and processes it starts) to `cpus`."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _ratio(mine: float | None, theirs: float | None) -> float:
    if mine is None or theirs is None or not (math.isfinite(mine) and math.isfinite(theirs)) or not theirs:
        return math.nan
    return mine / theirs


def ratios(mine: ScenarioResult, other: ScenarioResult) -> dict[str, float] | None:
    """One round's ratios mine/other (NaN where unknown), or None unless both runs measured
    cleanly. req/s: higher is better; latencies and CPU per request: lower is better."""
    if not (mine.measured and other.measured) or mine.load is None or other.load is None:
        return None
    m, o = mine.load, other.load
    doc = {"requests_per_s": _ratio(m.requests_per_s, o.requests_per_s)}
    for key in ("p50", "p90", "p99"):
        doc[f"{key}_latency"] = _ratio(m.percentiles_ms.get(key), o.percentiles_ms.get(key))
    doc["cpu_us_per_request"] = _ratio(mine.cpu_us_per_request(), other.cpu_us_per_request())
    return doc


RATIO_KEYS = ("requests_per_s", "p50_latency", "p90_latency", "p99_latency", "cpu_us_per_request")


@dataclass
class RatioSummary:
    """mine/other over the rounds in which both ran cleanly: each round's runs are paired (they
    ran minutes, not seconds, apart at most), and the median of the per-round ratios is what
    counts."""

    name: str
    per_round: dict[int, dict[str, float]]  # round -> that round's ratios

    @property
    def rounds(self) -> int:
        return len(self.per_round)

    def median(self, key: str) -> float:
        return _median([doc[key] for doc in self.per_round.values()])

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {key: _finite_or_none(self.median(key)) for key in RATIO_KEYS}
        doc["rounds"] = self.rounds
        doc["per_round"] = {
            str(n): {key: _finite_or_none(value) for key, value in ratio.items()}
            for n, ratio in self.per_round.items()
        }
        return doc


def paired_ratios(mine: ScenarioSummary, other: ScenarioSummary) -> RatioSummary | None:
    others = {r.round: r for r in other.runs}
    per_round: dict[int, dict[str, float]] = {}
    for run in mine.runs:
        if run.round in others and (doc := ratios(run, others[run.round])) is not None:
            per_round[run.round] = doc
    return RatioSummary(f"{mine.name}/{other.name}", per_round) if per_round else None


def policy_method(
    summary: RatioSummary | None, runs: Sequence[ScenarioResult], *, per_cpu: bool
) -> dict[str, Any]:
    """One measurement of what retry + breaker cost: the daemon/daemon-bare ratios, the
    throughput cost and the verdict against the target.

    The cost is 1 - the throughput ratio. Sequentially, throughput is req/s. In the concurrent
    A/B (`per_cpu`) it is req/s per CPU-second: the daemon is single-threaded and CPU-bound,
    so its throughput is 1 / (CPU per request), and the ratio does not depend on the two
    getting exactly the same share of the core or exactly the same window."""
    doc: dict[str, Any] = {
        "runs_per_scenario": len(runs) // 2,
        "basis": "requests per CPU-second" if per_cpu else "requests per second",
    }
    if summary is None:
        doc.update(rounds=0, throughput_cost=None, within_target=None)
        return doc

    def cost(ratios: dict[str, float]) -> float:
        if per_cpu:
            cpu = ratios["cpu_us_per_request"]
            return 1.0 - 1.0 / cpu if math.isfinite(cpu) and cpu else math.nan
        return 1.0 - ratios["requests_per_s"]

    median_cost = cost({key: summary.median(key) for key in RATIO_KEYS})
    doc.update(
        rounds=summary.rounds,
        throughput_cost=_finite_or_none(median_cost),
        throughput_cost_per_round={str(n): _finite_or_none(cost(r)) for n, r in summary.per_round.items()},
        requests_per_s_ratio=_finite_or_none(summary.median("requests_per_s")),
        cpu_us_per_request_ratio=_finite_or_none(summary.median("cpu_us_per_request")),
        p50_latency_ratio=_finite_or_none(summary.median("p50_latency")),
        p99_latency_ratio=_finite_or_none(summary.median("p99_latency")),
        within_target=bool(median_cost <= POLICY_COST_TARGET) if math.isfinite(median_cost) else None,
    )
    return doc


def policy_cost(sequential: dict[str, Any] | None, concurrent: dict[str, Any] | None) -> dict[str, Any]:
    """The policy-cost section of the JSON: both measurements, and the verdict from the
    concurrent one when it measured (it is the one that machine noise does not move)."""
    verdict_from = None
    for name, method in (("concurrent", concurrent), ("sequential", sequential)):
        if method is not None and method.get("throughput_cost") is not None:
            verdict_from = name
            break
    chosen = {"concurrent": concurrent, "sequential": sequential}.get(verdict_from or "") or {}
    return {
        "pair": "/".join(POLICY_PAIR),
        "target_max_throughput_cost": POLICY_COST_TARGET,
        "verdict_from": verdict_from,
        "throughput_cost": chosen.get("throughput_cost"),
        "within_target": chosen.get("within_target"),
        "concurrent": concurrent,
        "sequential": sequential,
    }


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value * 100:.1f}%"


def render(summaries: Sequence[ScenarioSummary], ratio_rows: Sequence[RatioSummary]) -> str:
    header = (
        "scenario",
        "runs",
        "req/s",
        "spread",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "cpu us/req",
        "status",
    )
    rows: list[tuple[str, ...]] = [header]
    for s in summaries:
        measured = len(s.measured)
        status = s.status if s.status == "ok" else f"{s.status}: {s.reason}"
        if not measured:
            rows.append((s.name, f"0/{len(s.runs)}", *("-" * 7), status))
            continue
        rows.append(
            (
                s.name,
                str(measured) if measured == len(s.runs) else f"{measured}/{len(s.runs)}",
                _fmt(s.requests_per_s(), 0),
                _fmt_pct(s.spread()),
                _fmt(s.percentile_ms("p50"), 2),
                _fmt(s.percentile_ms("p90"), 2),
                _fmt(s.percentile_ms("p99"), 2),
                str(s.error_count()),
                _fmt(s.cpu_us_per_request(), 0),
                status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:], strict=True)]
        lines.append("  ".join([*cells, row[-1]]))
    if ratio_rows:
        lines.append("")
        width = max(len(r.name) for r in ratio_rows)
        for r in ratio_rows:
            lines.append(
                f"{r.name.ljust(width)}  req/s {_fmt_ratio(r.median('requests_per_s'))}"
                f"  p50 {_fmt_ratio(r.median('p50_latency'))}"
                f"  p90 {_fmt_ratio(r.median('p90_latency'))}"
                f"  p99 {_fmt_ratio(r.median('p99_latency'))}"
                f"  cpu/req {_fmt_ratio(r.median('cpu_us_per_request'))}"
                f"  (median of {r.rounds} round{'s' if r.rounds != 1 else ''})"
            )
    return "\n".join(lines)


def render_policy_cost(doc: dict[str, Any]) -> str:
    """The policy-cost verdict: how much throughput retry + breaker take, against the target."""
    lines = [
        f"policy cost: retry + breaker, daemon vs daemon-bare "
        f"(target: at most {POLICY_COST_TARGET * 100:g}% of throughput)",
    ]
    rows: list[tuple[str, ...]] = []
    for name, title in (
        ("concurrent", "concurrent, one shared core"),
        ("sequential", "sequential, alternating"),
    ):
        method = doc.get(name)
        if method is None:
            continue
        rounds = method["rounds"]
        heading = f"{title}, {rounds} round{'s' if rounds != 1 else ''}"
        if method.get("throughput_cost") is None:
            rows.append((heading, "not measured: both daemons must run cleanly"))
            continue
        per_round = ", ".join(_fmt_pct(v) for v in method["throughput_cost_per_round"].values())
        verdict = "met" if method["within_target"] else "NOT met"
        if name == doc["verdict_from"]:
            verdict += " <- verdict"
        rows.append(
            (
                heading,
                f"cost {_fmt_pct(method['throughput_cost']):>6} of "
                + ("req/s per CPU-s" if name == "concurrent" else "req/s          "),
                f"req/s {_fmt_ratio(method['requests_per_s_ratio'])}",
                f"cpu/req {_fmt_ratio(method['cpu_us_per_request_ratio'])}",
                f"p50 {_fmt_ratio(method['p50_latency_ratio'])}",
                f"p99 {_fmt_ratio(method['p99_latency_ratio'])}",
                verdict,
                f"(cost per round: {per_round})",
            )
        )
    width = max((len(row[0]) for row in rows), default=0)
    lines.extend("  " + "  ".join([row[0].ljust(width), *row[1:]]) for row in rows)
    chosen = doc.get(doc.get("verdict_from") or "")
    if chosen is not None and chosen["rounds"] < DEFAULT_CONCURRENT_ROUNDS:
        lines.append(
            f"  (the verdict rests on {chosen['rounds']} round{'s' if chosen['rounds'] != 1 else ''}: "
            f"use {DEFAULT_CONCURRENT_ROUNDS} or more before trusting a difference of a few percent)"
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


def _package_digest() -> str:
    """A digest of the package's sources, which every daemon run imports afresh: when it
    differs between the start and the end of a run, the runs mixed two versions of the code."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "resilient_ambassador").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0")
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    os.environ.update(_child_env())
    bench = Bench(args)
    started = time.monotonic()
    has_pair = set(POLICY_PAIR) <= set(args.scenario_list)
    concurrent_rounds = args.concurrent_rounds if has_pair else 0
    meta: dict[str, Any] = {
        "benchmark": "passthrough",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": _git_describe(),
        "package_digest": _package_digest(),
        "size_bytes": args.size,
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "processes": args.processes,
        "repeat": args.repeat,
        "concurrent_rounds": concurrent_rounds,
        "scenarios": args.scenario_list,
        "generator": bench.generator,
        "upstream_program": str(bench.upstream_program),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    print(
        f"passthrough: {args.size} B body, {args.connections} keep-alive connections, "
        f"{args.warmup:g} s warm-up + {args.duration:g} s per run, "
        f"{args.repeat} round{'s' if args.repeat != 1 else ''} (alternating order)"
        f"{f' + {concurrent_rounds} concurrent' if concurrent_rounds else ''}, "
        f"generator {bench.generator} x{min(args.processes, args.connections)}, "
        f"upstream {bench.upstream_program}",
        flush=True,
    )
    busy = meta["loadavg_before"] is not None and meta["loadavg_before"][0] > (os.cpu_count() or 1)
    if busy:
        print(f"  warning: load average {meta['loadavg_before'][0]} before the run: numbers will be noisy")
    order = run_order(args.scenario_list, args.repeat)
    meta["run_order"] = [f"{name}#{round_no}" for round_no, name in order]
    daemon_cpus, other_cpus = split_cpus()
    meta["concurrent_cpus"] = (
        {"daemons": sorted(daemon_cpus), "others": sorted(other_cpus)}
        if daemon_cpus is not None and other_cpus is not None
        else None
    )
    results: list[ScenarioResult] = []
    concurrent_results: list[ScenarioResult] = []
    with contextlib.ExitStack() as stack:
        upstream = bench.start_upstream()
        stack.callback(upstream.close)
        for round_no, name in order:
            print(f"  round {round_no}/{args.repeat}: running {name} ...", flush=True)
            results.append(bench.run_scenario(name, upstream, round_no))
        if concurrent_rounds and other_cpus is not None:
            upstream.pin(other_cpus)  # off the daemons' core from here on (the last phase)
        for round_no in range(1, concurrent_rounds + 1):
            where = f"CPU {min(daemon_cpus)}" if daemon_cpus is not None else "unpinned"
            print(
                f"  concurrent round {round_no}/{concurrent_rounds}: running {' + '.join(POLICY_PAIR)} "
                f"at once ({where}) ...",
                flush=True,
            )
            concurrent_results.extend(bench.run_concurrent_pair(upstream, round_no))
        upstream_exit = upstream.stop()
        upstream_stderr = upstream.stderr_text()

    summaries = [ScenarioSummary(name, [r for r in results if r.name == name]) for name in args.scenario_list]
    by_name = {s.name: s for s in summaries}
    ratio_rows = [
        summary
        for mine, other in RATIO_PAIRS
        if mine in by_name
        and other in by_name
        and (summary := paired_ratios(by_name[mine], by_name[other])) is not None
    ]
    policy_doc = None
    if has_pair:
        sequential = policy_method(
            next((r for r in ratio_rows if r.name == "/".join(POLICY_PAIR)), None),
            [r for r in results if r.name in POLICY_PAIR],
            per_cpu=False,
        )
        concurrent = None
        if concurrent_results:
            mine, other = (
                ScenarioSummary(name, [r for r in concurrent_results if r.name == name])
                for name in POLICY_PAIR
            )
            concurrent = policy_method(paired_ratios(mine, other), concurrent_results, per_cpu=True)
            concurrent["pinned"] = meta["concurrent_cpus"]
            concurrent["run_details"] = [r.as_json() for r in concurrent_results]
        policy_doc = policy_cost(sequential, concurrent)

    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["git_after"] = _git_describe()
    meta["package_digest_after"] = _package_digest()
    meta["loadavg_after"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    document = {
        "meta": meta,
        "scenarios": [s.as_json() for s in summaries],
        "ratios": {r.name: r.as_json() for r in ratio_rows},
        "policy_cost": policy_doc,
        "upstream": {"exit_code": upstream_exit, "stderr_tail": _tail(upstream_stderr)},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")

    print()
    print(render(summaries, ratio_rows))
    if policy_doc is not None:
        print()
        print(render_policy_cost(policy_doc))
    every_run = results + concurrent_results
    problems = [f"{r.label}: {note}" for r in every_run for note in r.notes]
    problems += [
        f"{r.label}: {r.load.error_count} errors {r.load.errors}"
        for r in every_run
        if r.load and r.load.error_count
    ]
    problems += [f"{r.label}: {r.status}: {r.reason}" for r in every_run if r.status == "failed"]
    if meta["package_digest_after"] != meta["package_digest"]:
        problems.append(
            f"the package sources changed during the run (git {meta['git']} -> {meta['git_after']}): "
            "the runs mix versions of the daemon"
        )
    for r in every_run:
        if r.stderr.strip():
            problems.append(f"{r.label} stderr (last lines):\n    " + "\n    ".join(_tail(r.stderr, 10)))
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
