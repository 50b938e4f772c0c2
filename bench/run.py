"""The benchmark harness: every scenario of issue #10 in one run, one table, one verdict per target.

.venv/bin/python bench/run.py [--quick] [--scenarios a,b,c] [--list] [--rate 1000] [--target URL]

Throughput scenarios run in rounds of alternating order (--repeat, default 3): each starts its
servers, takes a closed-loop measurement (--connections keep-alive connections for --duration
seconds; wrk when installed, else the built-in generator) and an open-loop one (a constant
--rate req/s from the built-in generator, latency from each request's intended send time:
no coordinated omission), then stops them. The table shows medians over the rounds; each
ratio is the median of its per-round ratios. Resource scenarios (idle RSS, idle keep-alive
connections, a soak) run once, after the rounds. Everything listens on 127.0.0.1; every
server gets a free port, runs in its own session and is stopped by the harness.

Results: bench/results/run-<timestamp>.json, latest.json, latest.md and, with matplotlib, a
PNG plot. Exit status 1 when a measurement is suspect (a run failed, errors, a daemon did not
exit cleanly); a target not met is a result, not a failure. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import itertools
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, final

from harness import (
    GENERATOR_HEADROOM,
    evaluate_targets,
    median,
    per_round_difference,
    per_round_ratio,
    render_markdown,
    render_text,
    rss_growth,
    run_order,
)
from loadgen import GeneratorName, LoadError, LoadResult, LoadSpec, hdr_available, run_load, wrk_path
from servers import LOOPBACK, ServerFailed, ServerProcess, daemon_argv, free_port, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
DEFAULT_RESULTS = BENCH_DIR / "results"
DEFAULT_REDIS_URL = f"redis://{LOOPBACK}:6379/0"
SMALL_BYTES = 1024
LARGE_BYTES = 64 * 1024
# The daemon's pass-through flags: its defaults (retry and breaker on) plus the memory cache,
# which misses every request (unique paths; the canned response has no freshness, so nothing
# is stored). Tracing is off unless OTEL_* says otherwise, and the harness clears those.
PASSTHROUGH_FLAGS = ("--cache",)
IDLE_CONNECTIONS = 5000
QUICK_IDLE_CONNECTIONS = 1000
STDERR_TAIL_LINES = 20


@final
@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "http": closed + open loop in rounds; "resource": once, after the rounds
    description: str
    upstream: str | None = "small"  # which shared upstream it needs: small, large, tls, or none
    unique_paths: bool = True
    expect_status: str = "2"


SCENARIOS = (
    Scenario(
        "direct", "http", "load generator -> canned upstream (1 KiB): the ceiling, and the generator's proof"
    ),
    Scenario("direct-64k", "http", "load generator -> canned upstream (64 KiB)", upstream="large"),
    Scenario("reference-forwarder", "http", "-> minimal_forwarder.py -> upstream: bare trio + h11 forwarder"),
    Scenario("dict-server", "http", "-> dict_server.py: bare trio + h11 answering from a dict", None, False),
    Scenario(
        "nginx", "http", "-> nginx reverse proxy (keep-alive upstream pool) -> upstream, when installed"
    ),
    Scenario(
        "daemon-1k", "http", "-> daemon, defaults (retry, breaker) + memory cache missing -> upstream (1 KiB)"
    ),
    Scenario("daemon-64k", "http", "the same with 64 KiB responses", upstream="large"),
    Scenario("cache-memory", "http", "-> daemon --cache-ttl 1h: memory cache hits", unique_paths=False),
    Scenario(
        "cache-redis",
        "http",
        "-> daemon, Redis cache backend (127.0.0.1:6379, own key prefix): near-cache hits",
        unique_paths=False,
    ),
    Scenario("ratelimit", "http", "-> daemon-1k + --rate-limit 1000000/s (memory; admits everything)"),
    Scenario(
        "ratelimit-redis",
        "http",
        "-> daemon-1k + a 1000000/s limit shared in Redis (127.0.0.1:6379, own key prefix)",
    ),
    Scenario("ratelimit-redis-lease", "http", "ratelimit-redis with `lease: 10` (tokens taken 10 at a time)"),
    Scenario(
        "breaker-open",
        "http",
        "-> daemon, upstream down, breaker open: fast-fail 503s",
        upstream=None,
        expect_status="503",
    ),
    Scenario(
        "tls-upstream", "http", "-> daemon-1k originating TLS (trustme CA) -> TLS upstream", upstream="tls"
    ),
    Scenario("tcp-relay", "http", "-> daemon --upstream tcp:// (TCP relay) -> upstream"),
    Scenario("daemon-2-workers", "http", "daemon-1k with --workers 2 (ratio against daemon-1k)"),
    Scenario("idle-rss", "resource", "daemon-1k's RSS after start-up and a few requests", None),
    Scenario("idle-connections", "resource", "RSS added by idle keep-alive client connections", None),
    Scenario("soak", "resource", "daemon-1k under closed-loop load for --soak-seconds: RSS flat?"),
)
BY_NAME = {s.name: s for s in SCENARIOS}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Issue #10's benchmark harness: scenarios, ratios and targets in one run.",
        epilog="Scenarios: " + ", ".join(BY_NAME) + " (--list describes them).",
    )
    parser.add_argument("--list", action="store_true", help="describe the scenarios and exit")
    parser.add_argument("--scenarios", help="comma list of scenarios to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1 s each (~1-2 minutes)")
    parser.add_argument("--duration", type=float, help="measured seconds per load (default 5; quick 1)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each (default 1; quick 0.25)")
    parser.add_argument("--repeat", type=int, help="rounds, alternating order (default 3; quick 1)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    parser.add_argument("--processes", type=int, default=2, help="load processes (wrk threads), default 2")
    parser.add_argument(
        "--rate",
        type=float,
        default=1000.0,
        help="open-loop constant rate in req/s (default 1000; 0: no open-loop measurement)",
    )
    parser.add_argument("--generator", choices=["auto", "wrk", "builtin"], default="auto")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, s (default 5)")
    parser.add_argument("--soak-seconds", type=float, help="soak length (default 300; quick 10)")
    parser.add_argument(
        "--idle-connections",
        type=int,
        help=f"idle keep-alive connections to open (default {IDLE_CONNECTIONS}; "
        f"quick {QUICK_IDLE_CONNECTIONS})",
    )
    parser.add_argument(
        "--reference-dir",
        type=Path,
        help="where minimal_forwarder.py, dict_server.py and canned_upstream.py are "
        "(default: ../shared/bench-reference beside the repository, "
        "or $AMBASSADOR_SHARED_DIR/bench-reference)",
    )
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help=f"for cache-redis (default {DEFAULT_REDIS_URL})"
    )
    parser.add_argument(
        "--target",
        help="load-test this http:// URL instead of the scenarios (closed loop, and open loop at --rate)",
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_RESULTS, help="default bench/results")
    args = parser.parse_args(argv)
    args.duration = args.duration if args.duration is not None else (1.0 if args.quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.25 if args.quick else 1.0)
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    args.soak_seconds = (
        args.soak_seconds if args.soak_seconds is not None else (10.0 if args.quick else 300.0)
    )
    if args.idle_connections is None:
        args.idle_connections = QUICK_IDLE_CONNECTIONS if args.quick else IDLE_CONNECTIONS
    for name in ("connections", "processes", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.duration <= 0 or args.warmup < 0 or args.timeout <= 0 or args.rate < 0 or args.soak_seconds <= 0:
        parser.error(
            "--duration, --timeout and --soak-seconds must be positive; --warmup and --rate not negative"
        )
    if args.idle_connections < 1:
        parser.error("--idle-connections must be at least 1")
    if args.scenarios is None:
        args.scenario_list = list(BY_NAME)
    else:
        args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        unknown = [s for s in args.scenario_list if s not in BY_NAME]
        if unknown or not args.scenario_list:
            parser.error(f"--scenarios: unknown {unknown}; --list shows them")
    if args.target is not None:
        try:
            args.target_parts = parse_target(args.target)
        except ValueError as exc:
            parser.error(f"--target: {exc}")
    return args


def parse_target(url: str) -> tuple[str, int, str]:
    """(host, port, path with query) of an http:// URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"{url!r}: only http:// URLs (the built-in generator speaks plain HTTP/1.1)")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, path


def reference_dir(args: argparse.Namespace) -> Path | None:
    if args.reference_dir is not None:
        return args.reference_dir if args.reference_dir.is_dir() else None
    shared = os.environ.get("AMBASSADOR_SHARED_DIR")
    candidate = (Path(shared) if shared else REPO_ROOT.parent / "shared") / "bench-reference"
    return candidate if candidate.is_dir() else None


def child_env() -> dict[str, str]:
    """For every server: this checkout's package first on the path, and no OTEL_* settings
    from the caller's shell (tracing stays off, as the scenarios say)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


PORT = "{port}"  # where with_port puts the port a server was given


def with_port(template: Sequence[str]) -> Callable[[int], list[str]]:
    """An argv for `start_server`: PORT in the template replaced by the port."""
    return lambda port: [str(port) if part == PORT else part for part in template]


class Skip(Exception):
    """A scenario cannot run here (a program or service is missing): a note, not a failure."""


@dataclass
class Run:
    """One scenario in one round."""

    name: str
    round: int
    status: str = "ok"  # ok | failed | skipped
    reason: str = ""
    closed: LoadResult | None = None
    open: LoadResult | None = None
    cpu_s: float | None = None  # the loaded process, over the closed-loop window
    redis_calls: int | None = None  # the daemon's Redis round trips (/stats), same window
    rss_kib: int | None = None
    exit_code: int | None = None
    stderr: str = ""
    notes: list[str] = field(default_factory=list)

    def redis_calls_per_request(self) -> float:
        if self.redis_calls is None or self.closed is None or not self.closed.requests:
            return math.nan
        return self.redis_calls / self.closed.requests

    def cpu_us_per_request(self) -> float:
        if self.cpu_s is None or self.closed is None or not self.closed.requests:
            return math.nan
        return self.cpu_s / self.closed.requests * 1e6

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "round": self.round, "status": self.status}
        if self.reason:
            doc["reason"] = self.reason
        for key, load in (("closed", self.closed), ("open", self.open)):
            if load is not None:
                doc[key] = load_json(load)
        doc.update(
            cpu_s=self.cpu_s,
            cpu_us_per_request=finite(self.cpu_us_per_request()),
            redis_calls_per_request=finite(self.redis_calls_per_request()),
            rss_kib=self.rss_kib,
            exit_code=self.exit_code,
            stderr_tail=self.stderr.splitlines()[-STDERR_TAIL_LINES:],
            notes=self.notes,
        )
        return doc


def finite(value: float | None, digits: int = 3) -> float | None:
    return round(value, digits) if value is not None and math.isfinite(value) else None


def load_json(load: LoadResult) -> dict[str, Any]:
    return {
        "generator": load.generator,
        "mode": load.mode,
        "requests": load.requests,
        "measured_s": load.measured_s,
        "requests_per_s": round(load.requests_per_s, 1),
        "latency_ms": {k: finite(v) for k, v in load.percentiles_ms.items()},
        "errors": load.error_count,
        "errors_by_kind": load.errors,
        "rate_per_s": load.rate_per_s or None,
        "scheduled": load.scheduled if load.mode == "open" else None,
        "unsent": load.unsent if load.mode == "open" else None,
        "saturated": load.saturated if load.mode == "open" else None,
        "percentiles_from": load.histogram,
    }


def summarise(name: str, runs: Sequence[Run]) -> dict[str, Any]:
    """A scenario over its rounds: medians of the runs that measured."""
    measured = [r for r in runs if r.status == "ok" and r.closed is not None]
    closed = [r.closed for r in measured if r.closed is not None]
    opened = [r.open for r in measured if r.open is not None]
    status = (
        "skipped"
        if runs and all(r.status == "skipped" for r in runs)
        else ("ok" if all(r.status == "ok" for r in runs) else "failed")
    )
    reason = next((r.reason for r in runs if r.status != "ok"), "")
    return {
        "name": name,
        "description": BY_NAME[name].description if name in BY_NAME else name,
        "status": status,
        "reason": reason or None,
        "runs": len(runs),
        "measured_runs": len(measured),
        "requests_per_s": finite(median([c.requests_per_s for c in closed]), 1),
        "requests_per_s_runs": [round(c.requests_per_s, 1) for c in closed],
        "p50_ms": finite(median([c.percentiles_ms.get("p50") for c in closed])),
        "p90_ms": finite(median([c.percentiles_ms.get("p90") for c in closed])),
        "p99_ms": finite(median([c.percentiles_ms.get("p99") for c in closed])),
        "errors": sum(r.closed.error_count for r in runs if r.closed is not None)
        + sum(r.open.error_count for r in runs if r.open is not None),
        "cpu_us_per_request": finite(median([r.cpu_us_per_request() for r in measured]), 1),
        "redis_calls_per_request": finite(median([r.redis_calls_per_request() for r in measured]), 3),
        "rss_kib": int(median([r.rss_kib for r in measured])) if any(r.rss_kib for r in measured) else None,
        "open_p50_ms": finite(median([o.percentiles_ms.get("p50") for o in opened])),
        "open_p99_ms": finite(median([o.percentiles_ms.get("p99") for o in opened])),
        "open_p99_9_ms": finite(median([o.percentiles_ms.get("p99.9") for o in opened])),
        "open_requests_per_s": finite(median([o.requests_per_s for o in opened]), 1),
        "open_saturated": any(o.saturated for o in opened),
        "run_details": [r.as_json() for r in runs],
    }


def per_round(runs: Sequence[Run], name: str, value: Callable[[Run], float | None]) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in runs:
        if r.name == name and r.status == "ok":
            v = value(r)
            if v is not None and math.isfinite(v):
                out[r.round] = v
    return out


def closed_rps(r: Run) -> float | None:
    return r.closed.requests_per_s if r.closed is not None else None


def open_pct(key: str) -> Callable[[Run], float | None]:
    def get(r: Run) -> float | None:
        # A saturated run counts too: its percentiles are lower bounds (the unsent requests are
        # recorded with the time they had waited when the window closed), so a target it
        # misses is missed, not unmeasured.
        return r.open.percentiles_ms.get(key) if r.open is not None else None

    return get


@final
class Bench:
    """Owns the shared servers (upstreams), starts each scenario's server, runs the loads."""

    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.stack = stack
        self.env = child_env()
        self.reference = reference_dir(args)
        self.generator: GeneratorName = (
            "wrk" if args.generator == "wrk" or (args.generator == "auto" and wrk_path()) else "builtin"
        )
        self.scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-run-")))
        self._upstreams: dict[str, ServerProcess] = {}
        self._ca_file: Path | None = None
        self.redis_prefix = f"bench-{uuid.uuid4().hex[:12]}:"
        self.redis_used = False
        self.dead_upstreams: list[dict[str, Any]] = []

    # -- shared upstreams ------------------------------------------------------------------

    def upstream_program(self) -> Path:
        if self.reference is not None and (self.reference / "canned_upstream.py").is_file():
            return self.reference / "canned_upstream.py"
        return BENCH_DIR / "canned_upstream.py"

    def upstream(self, which: str) -> ServerProcess:
        existing = self._upstreams.get(which)
        if existing is not None and existing.alive():
            return existing
        if existing is not None:  # died: recorded (the run it died in failed), then replaced
            self.dead_upstreams.append(
                {
                    "upstream": which,
                    "exit_code": existing.stop(),
                    "stderr_tail": existing.stderr_text().splitlines()[-20:],
                }
            )
        if which == "tls":
            cert, key = self._tls_files()
            program = str(BENCH_DIR / "canned_upstream.py")  # the asyncio one speaks TLS
            extra = ["--certfile", str(cert), "--keyfile", str(key)]
            size = SMALL_BYTES
        else:
            program, extra = str(self.upstream_program()), []
            size = LARGE_BYTES if which == "large" else SMALL_BYTES
        server = start_server(
            f"upstream-{which}",
            lambda port: [sys.executable, program, "--listen", str(port), "--size", str(size), *extra],
            env=self.env,
        )
        self.stack.callback(server.close)
        self._upstreams[which] = server
        return server

    def _tls_files(self) -> tuple[Path, Path]:
        try:
            import trustme
        except ImportError:
            raise Skip("trustme is not installed (pip install -e '.[bench]')") from None
        ca = trustme.CA()
        cert = ca.issue_cert(LOOPBACK, "localhost")
        self._ca_file = self.scratch / "ca.pem"
        ca.cert_pem.write_to_path(str(self._ca_file))
        cert_path, key_path = self.scratch / "upstream.pem", self.scratch / "upstream.key"
        cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        return cert_path, key_path

    # -- scenario servers -----------------------------------------------------------------

    def daemon_argv(self, upstream_url: str, *flags: str) -> Callable[[int], list[str]]:
        # A fixed admin port, known here: --workers needs one, and /stats is read through it.
        return daemon_argv(upstream_url, *flags, admin=f"{LOOPBACK}:{free_port()}")

    def start(self, name: str) -> ServerProcess | None:
        """Start the scenario's server (None: the load goes to the upstream itself)."""
        scenario = BY_NAME[name]
        up = self.upstream(scenario.upstream) if scenario.upstream else None
        up_url = f"http://{LOOPBACK}:{up.port}" if up else ""
        env = self.env
        if name in ("direct", "direct-64k"):
            return None
        if name in ("reference-forwarder", "dict-server"):
            if self.reference is None:
                raise Skip("bench-reference/ not found (give --reference-dir)")
            if importlib.util.find_spec("h11") is None:
                raise Skip("the bench-reference programs need h11 (pip install -e '.[bench]')")
            if name == "dict-server":
                program = str(self.reference / "dict_server.py")
                argv = with_port([sys.executable, program, "--listen", PORT, "--size", str(SMALL_BYTES)])
            else:
                program = str(self.reference / "minimal_forwarder.py")
                assert up is not None
                argv = with_port(
                    [sys.executable, program, "--listen", PORT, "--upstream", f"{LOOPBACK}:{up.port}"]
                )
        elif name == "nginx":
            assert up is not None
            argv = self._nginx_argv(up.port)
        elif name in ("daemon-1k", "daemon-64k", "idle-rss", "idle-connections", "soak"):
            if up is None:
                up = self.upstream("small")
                up_url = f"http://{LOOPBACK}:{up.port}"
            argv = self.daemon_argv(up_url, *PASSTHROUGH_FLAGS)
        elif name == "daemon-2-workers":
            argv = self.daemon_argv(up_url, *PASSTHROUGH_FLAGS, "--workers", "2")
        elif name == "cache-memory":
            argv = self.daemon_argv(up_url, "--cache-ttl", "1h")
        elif name == "cache-redis":
            argv = self._redis_argv(up_url, REDIS_CACHE_CONF, "--cache-ttl", "1h")
        elif name in ("ratelimit-redis", "ratelimit-redis-lease"):
            lease = 10 if name.endswith("-lease") else 0
            argv = self._redis_argv(
                up_url, REDIS_RATELIMIT_CONF.replace("LEASE", str(lease)), *PASSTHROUGH_FLAGS
            )
        elif name == "ratelimit":
            argv = self.daemon_argv(up_url, *PASSTHROUGH_FLAGS, "--rate-limit", "1000000/s")
        elif name == "breaker-open":
            dead = free_port()  # nothing listens there: every connect is refused
            argv = self.daemon_argv(f"http://{LOOPBACK}:{dead}", *PASSTHROUGH_FLAGS, "--breaker-reset", "1h")
        elif name == "tls-upstream":
            assert up is not None
            assert self._ca_file is not None
            # The system trust store honours SSL_CERT_FILE (docs/configuration.md, tls.ca_file).
            env = {**self.env, "SSL_CERT_FILE": str(self._ca_file)}
            argv = self.daemon_argv(f"https://localhost:{up.port}", *PASSTHROUGH_FLAGS)
        elif name == "tcp-relay":
            assert up is not None
            argv = self.daemon_argv(f"tcp://{LOOPBACK}:{up.port}")
        else:
            raise AssertionError(f"no server for {name}")
        return start_server(name, argv, env=env)

    def _nginx_argv(self, upstream_port: int) -> Callable[[int], list[str]]:
        nginx = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
        )
        if nginx is None:
            raise Skip("nginx is not installed (apt-get install nginx-light)")
        prefix = self.scratch / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)

        def argv(port: int) -> list[str]:
            conf = prefix / f"nginx-{port}.conf"
            conf.write_text(
                NGINX_CONF.format(port=port, upstream_port=upstream_port, prefix=prefix, loopback=LOOPBACK)
            )
            return [nginx, "-p", str(prefix), "-c", str(conf), "-e", "stderr"]

        return argv

    def _redis_argv(self, upstream_url: str, conf: str, *flags: str) -> Callable[[int], list[str]]:
        host, port = redis_address(self.args.redis_url)
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                if not sock.recv(64).startswith(b"+PONG"):
                    raise OSError("no PONG")
        except OSError as exc:
            raise Skip(f"no Redis at {host}:{port} ({exc}); give --redis-url") from None
        config = self.scratch / f"redis-{len(list(self.scratch.glob('redis-*.yaml')))}.yaml"
        config.write_text(
            conf.format(upstream=upstream_url, redis_url=self.args.redis_url, prefix=self.redis_prefix)
        )
        self.redis_used = True
        return self.daemon_argv(upstream_url, "--config", str(config), *flags)

    def cleanup_redis(self) -> str | None:
        """Delete this run's keys (the unique prefix) from the shared Redis, with redis-cli."""
        if not self.redis_used:
            return None
        cli = shutil.which("redis-cli")
        if cli is None:
            return f"redis-cli not found: keys {self.redis_prefix}* expire by themselves"
        host, port = redis_address(self.args.redis_url)
        base = [cli, "-h", host, "-p", str(port)]
        keys = subprocess.run(
            [*base, "--scan", "--pattern", f"{self.redis_prefix}*"],
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout.split()  # fmt: skip
        for start in range(0, len(keys), 500):
            subprocess.run(
                [*base, "DEL", *keys[start : start + 500]], capture_output=True, timeout=30, check=False
            )
        return None

    # -- loads -----------------------------------------------------------------------------

    def spec(
        self, name: str, port: int, rate_per_s: float = 0.0, host: str = LOOPBACK, path: str = "/bench"
    ) -> LoadSpec:
        scenario = BY_NAME.get(name)
        return LoadSpec(
            host=host,
            port=port,
            connections=self.args.connections,
            duration_s=self.args.duration,
            warmup_s=self.args.warmup,
            processes=self.args.processes,
            timeout_s=self.args.timeout,
            path=path,
            unique_paths=scenario.unique_paths if scenario else False,
            expect_status=scenario.expect_status if scenario else "2",
            rate_per_s=rate_per_s,
        )

    def run_http(self, name: str, round_no: int) -> Run:
        run = Run(name, round_no)
        try:
            server = self.start(name)
        except Skip as exc:
            run.status, run.reason = "skipped", str(exc)
            return run
        except ServerFailed as exc:
            run.status, run.reason, run.stderr = "failed", str(exc).splitlines()[0], str(exc)
            return run
        scenario = BY_NAME[name]
        up = self._upstreams.get(scenario.upstream or "")
        loaded = server or up
        assert loaded is not None
        try:
            if name == "breaker-open":
                # Open the breaker before any load: the failures that open it are answered
                # 502 (connect refused, after a retry), which are not what this measures.
                statuses = send_requests(loaded.port, 50, until_status=503)
                if statuses[-1] != 503:
                    run.status, run.reason = "failed", f"the breaker did not open: statuses {statuses[-5:]}"
                    return run
            self.measure(run, self.spec(name, loaded.port), loaded)
            if run.status == "ok" and self.args.rate > 0:
                self.measure(run, self.spec(name, loaded.port, self.args.rate), loaded)
        finally:
            if server is not None:
                try:
                    run.exit_code = server.stop()
                    run.stderr = server.stderr_text()
                finally:
                    server.close()
                is_daemon = name not in ("reference-forwarder", "dict-server", "nginx")
                if is_daemon and run.exit_code != 0:
                    run.notes.append(f"exited {run.exit_code} after SIGTERM (expected 0)")
                if unexpected := unexpected_stderr(name, run.stderr):
                    run.notes.append(f"wrote {len(unexpected)} unexpected lines to stderr: {unexpected[0]}")
        return run

    def measure(self, run: Run, spec: LoadSpec, server: ServerProcess) -> None:
        cpu: dict[str, float | None] = {}
        redis: dict[str, int | None] = {}
        admin = admin_address(server.argv)

        def start() -> None:
            cpu["start"] = server.tree_cpu_s()
            redis["start"] = redis_calls(admin)

        def stop() -> None:
            cpu["stop"] = server.tree_cpu_s()
            redis["stop"] = redis_calls(admin)
            run.rss_kib = server.rss_kib()

        try:
            result = run_load(spec, self.generator, start, stop)
        except LoadError as exc:
            run.status, run.reason = "failed", str(exc)
            return
        if spec.rate_per_s > 0:
            run.open = result
        else:
            run.closed = result
            before, after = cpu.get("start"), cpu.get("stop")
            run.cpu_s = None if before is None or after is None else round(after - before, 3)
            calls_before, calls_after = redis.get("start"), redis.get("stop")
            if calls_before is not None and calls_after is not None:
                run.redis_calls = calls_after - calls_before
        if not server.alive():
            run.status, run.reason = "failed", f"{server.name} died under load"
        for which, upstream in self._upstreams.items():
            if upstream is not server and not upstream.alive():
                run.status, run.reason = "failed", f"upstream {which} died: {upstream.stderr_text()[-300:]}"

    # -- resources ----------------------------------------------------------------------

    def run_resources(self, names: Sequence[str], progress: Callable[[str], None]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "idle-rss" in names or "idle-connections" in names:
            daemon = self.start("idle-rss")
            assert daemon is not None
            try:
                send_requests(daemon.port, 10)
                time.sleep(1.0)
                idle_kib = daemon.rss_kib()
                if "idle-rss" in names:
                    out["idle-rss"] = {"rss_mib": mib(idle_kib), "after": "start-up, 10 requests, 1 s idle"}
                    progress(f"idle-rss: {mib(idle_kib)} MiB")
                if "idle-connections" in names:
                    out["idle-connections"] = self._idle_connections(daemon, idle_kib, progress)
            finally:
                daemon.close()
        if "soak" in names:
            out["soak"] = self._soak(progress)
        return out

    def _idle_connections(
        self, daemon: ServerProcess, idle_kib: int | None, progress: Callable[[str], None]
    ) -> dict[str, Any]:
        wanted = self.args.idle_connections
        progress(f"idle-connections: opening {wanted} keep-alive connections (one request each) ...")
        socks: list[socket.socket] = []
        failed = 0
        try:
            for i in range(wanted):
                try:
                    socks.append(keepalive_connection(daemon.port, f"/idle/{i}"))
                except OSError:
                    failed += 1
            time.sleep(1.0)
            loaded_kib = daemon.rss_kib()
            still_open = sum(1 for s in socks if connection_open(s))
        finally:
            for s in socks:
                s.close()
        added = mib(loaded_kib - idle_kib) if loaded_kib is not None and idle_kib is not None else None
        per_conn = (
            round((loaded_kib - idle_kib) * 1024 / len(socks))
            if loaded_kib is not None and idle_kib is not None and socks
            else None
        )
        progress(f"idle-connections: {len(socks)} open, RSS +{added} MiB ({per_conn} B each)")
        doc = {
            "connections": len(socks),
            "failed": failed,
            "still_open_after_1s": still_open,
            "rss_before_mib": mib(idle_kib),
            "rss_after_mib": mib(loaded_kib),
            "added_mib": added,
            "bytes_per_connection": per_conn,
        }
        # The target is for 5,000: scale a smaller run (--quick) linearly, and say so.
        if added is not None and socks and len(socks) != IDLE_CONNECTIONS:
            doc["added_mib_scaled_to_5000"] = round(added * IDLE_CONNECTIONS / len(socks), 1)
        return doc

    def _soak(self, progress: Callable[[str], None]) -> dict[str, Any]:
        seconds = self.args.soak_seconds
        progress(f"soak: daemon-1k under closed-loop load for {seconds:g} s, RSS sampled ...")
        daemon = self.start("soak")
        assert daemon is not None
        samples: list[tuple[float, int]] = []
        done = threading.Event()
        interval_s = max(seconds / 100.0, 0.5)

        def sample() -> None:
            began = time.monotonic()
            while not done.wait(interval_s):
                rss = daemon.rss_kib()
                if rss is not None:
                    samples.append((round(time.monotonic() - began, 1), rss))

        sampler = threading.Thread(target=sample, name="rss sampler", daemon=True)
        try:
            spec = LoadSpec(
                LOOPBACK, daemon.port, self.args.connections, seconds, 0.0, self.args.processes,
                self.args.timeout, unique_paths=True,
            )  # fmt: skip
            sampler.start()
            load = run_load(spec, self.generator)
        finally:
            done.set()
            sampler.join()
            daemon.close()
        growth = rss_growth([kib for _t, kib in samples])
        progress(
            f"soak: {load.requests} requests ({load.requests_per_s:.0f}/s), RSS "
            f"{mib(samples[0][1]) if samples else '-'} -> {mib(samples[-1][1]) if samples else '-'} MiB"
        )
        return {
            "seconds": seconds,
            "requests": load.requests,
            "requests_per_s": round(load.requests_per_s, 1),
            "errors": load.error_count,
            "rss_first_mib": mib(samples[0][1]) if samples else None,
            "rss_last_mib": mib(samples[-1][1]) if samples else None,
            "rss_max_mib": mib(max(k for _t, k in samples)) if samples else None,
            "growth_pct": finite(growth * 100, 2),
            "samples": [[t, kib] for t, kib in samples],
        }


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx-{port}.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  upstream canned {{ server {loopback}:{upstream_port}; keepalive 64; }}
  server {{
    listen {loopback}:{port};
    keepalive_requests 1000;
    location / {{
      proxy_pass http://canned;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""

# Redis-backed cache with this run's own key prefix (the shared Redis is never flushed): the
# listener and upstream here are placeholders, overridden by --listen and --upstream.
REDIS_CACHE_CONF = """\
listeners:
  - listen: 127.0.0.1:1
    routes:
      - upstream: canned
upstreams:
  canned:
    url: "{upstream}"
redis:
  url: "{redis_url}"
  key_prefix: "{prefix}"
cache:
  backend: redis
"""
REDIS_RATELIMIT_CONF = """\
listeners:
  - listen: 127.0.0.1:1
    routes:
      - upstream: canned
        rate_limit:
          rate: 1000000/s
          backend: redis
          lease: LEASE
upstreams:
  canned:
    url: "{upstream}"
redis:
  url: "{redis_url}"
  key_prefix: "{prefix}"
"""


def admin_address(argv: Sequence[str]) -> str | None:
    """The daemon's admin listener from its command line (None: not a daemon)."""
    for flag, value in itertools.pairwise(argv):
        if flag == "--admin":
            return value
    return None


def redis_calls(admin: str | None) -> int | None:
    """The daemon's Redis calls so far, from /stats (None without an admin listener or Redis).
    With --workers this is one worker's count (whichever answers): read it for one worker."""
    if admin is None:
        return None
    try:
        with urllib.request.urlopen(f"http://{admin}/stats", timeout=2.0) as reply:
            stats = json.load(reply)
    except (OSError, ValueError):
        return None
    calls = (stats.get("redis") or {}).get("calls")
    return calls if isinstance(calls, int) else None


def unexpected_stderr(name: str, stderr: str) -> list[str]:
    """Lines a server should not have written at --log-level warning. An open breaker logs a
    WARNING per answer it refuses (rate-limited), which is that scenario working; nginx logs
    its own start-up notices."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if name == "breaker-open":
        return [line for line in lines if " WARNING " not in line]
    if name == "nginx":
        return [line for line in lines if "[emerg]" in line or "[alert]" in line or "[crit]" in line]
    return lines


def redis_address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or LOOPBACK, parts.port or 6379


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _read_response(sock: socket.socket) -> int:
    """Read one content-length-framed response off a blocking socket; its status code."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("closed mid-body")
        body += chunk
    return int(head[9:12])


def keepalive_connection(port: int, path: str) -> socket.socket:
    """A connection that has made one request and stays open, idle (a keep-alive client)."""
    sock = socket.create_connection((LOOPBACK, port), timeout=10.0)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode())
        _read_response(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def connection_open(sock: socket.socket) -> bool:
    try:
        sock.setblocking(False)
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def send_requests(port: int, count: int, until_status: int | None = None) -> list[int]:
    """`count` requests one after the other on one connection (fewer once a response has
    `until_status`); their status codes."""
    statuses = []
    with contextlib.closing(socket.create_connection((LOOPBACK, port), timeout=10.0)) as sock:
        for i in range(count):
            sock.sendall(f"GET /warm/{i} HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode())
            statuses.append(_read_response(sock))
            if statuses[-1] == until_status:
                break
    return statuses


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit (inherited by the servers it starts) toward
    `wanted`, within the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def git_describe() -> str | None:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def per_cpu_values(runs: Sequence[Run]) -> dict[str, float | None]:
    """The throughput ratios in requests per CPU-second (see `evaluate_targets`); not for
    --workers, whose point is using more CPU."""

    def per_cpu_s(r: Run) -> float | None:
        cpu_us = r.cpu_us_per_request()
        return 1e6 / cpu_us if math.isfinite(cpu_us) and cpu_us > 0 else None

    def ratio(mine: str, theirs: str) -> float:
        return per_round_ratio(per_round(runs, mine, per_cpu_s), per_round(runs, theirs, per_cpu_s))

    return {
        "passthrough_vs_reference": ratio("daemon-1k", "reference-forwarder"),
        "cache_memory_vs_dict_server": ratio("cache-memory", "dict-server"),
        "cache_redis_vs_memory": ratio("cache-redis", "cache-memory"),
    }


def target_values(runs: Sequence[Run], resources: dict[str, Any]) -> dict[str, float | None]:
    """The figure each target is judged on, from this run's measurements."""

    def ratio(mine: str, theirs: str) -> float:
        return per_round_ratio(per_round(runs, mine, closed_rps), per_round(runs, theirs, closed_rps))

    values: dict[str, float | None] = {
        "passthrough_vs_reference": ratio("daemon-1k", "reference-forwarder"),
        "cache_memory_vs_dict_server": ratio("cache-memory", "dict-server"),
        "cache_redis_vs_memory": ratio("cache-redis", "cache-memory"),
        "workers_2_vs_1": ratio("daemon-2-workers", "daemon-1k"),
        "added_latency_p50_ms": per_round_difference(
            per_round(runs, "daemon-1k", open_pct("p50")), per_round(runs, "direct", open_pct("p50"))
        ),
        "added_latency_p99_ms": per_round_difference(
            per_round(runs, "daemon-1k", open_pct("p99")), per_round(runs, "direct", open_pct("p99"))
        ),
    }
    if "idle-rss" in resources:
        values["idle_rss_mib"] = resources["idle-rss"]["rss_mib"]
    if "idle-connections" in resources:
        conns = resources["idle-connections"]
        values["idle_connections_rss_mib"] = conns.get("added_mib_scaled_to_5000", conns["added_mib"])
    if "soak" in resources:
        values["soak_rss_growth_pct"] = resources["soak"]["growth_pct"]
    return values


HEADROOM_PAIRS = (("direct", "daemon-1k"), ("direct-64k", "daemon-64k"))


def generator_headroom(runs: Sequence[Run]) -> dict[str, float | None]:
    """How far above the daemon the same generator drove the bare upstream (per-round median):
    the proof that the generator is not what limits the daemon's figures."""
    return {
        f"{direct}/{daemon}": finite(
            per_round_ratio(per_round(runs, direct, closed_rps), per_round(runs, daemon, closed_rps)), 2
        )
        for direct, daemon in HEADROOM_PAIRS
    }


def warnings_for(runs: Sequence[Run], meta: dict[str, Any]) -> list[str]:
    warnings = []
    for (direct, daemon), headroom in zip(HEADROOM_PAIRS, generator_headroom(runs).values(), strict=True):
        if headroom is not None and headroom < GENERATOR_HEADROOM:
            warnings.append(
                f"{direct} is only {headroom:.1f}x {daemon} (want >= {GENERATOR_HEADROOM:g}x): the load "
                "generator or the machine may be what limits the daemon's figures"
            )
    if any(r.name == "daemon-2-workers" for r in runs):
        warnings.append(
            f"--workers 2 ran on {meta['cpus_usable']} usable CPU(s) shared with the load generator and "
            "the upstream: the ratio understates what two free cores give"
        )
    load_before = meta.get("loadavg_before")
    if load_before and load_before[0] > (meta.get("cpus_usable") or 1):
        warnings.append(
            f"load average {load_before[0]} before the run: the machine was busy, numbers are noisy"
        )
    for r in runs:
        if r.open is not None and r.open.saturated and r.name in ("direct", "daemon-1k"):
            warnings.append(f"{r.name} (round {r.round}) could not keep up with {r.open.rate_per_s:g} req/s")
    return warnings


def write_plot(doc: dict[str, Any], path: Path) -> str | None:
    """Throughput and open-loop latency percentiles per scenario, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]'): no plot"
    rows = [s for s in doc["scenarios"] if s.get("requests_per_s")]
    if not rows:
        return None
    names = [s["name"] for s in rows]
    percentiles = (("open_p50_ms", "p50"), ("open_p99_ms", "p99"), ("open_p99_9_ms", "p99.9"))
    has_open = any(s.get(key) for s in rows for key, _label in percentiles)
    fig, axes = plt.subplots(
        1, 2 if has_open else 1, figsize=(13 if has_open else 7, 0.45 * len(rows) + 1.8), squeeze=False
    )
    left = axes[0][0]
    ys = list(range(len(rows)))
    left.barh(ys, [s["requests_per_s"] for s in rows], color="tab:blue")
    left.set_yticks(ys, names)
    left.invert_yaxis()
    left.set_xlabel("closed loop, req/s (median)")
    if has_open:
        right = axes[0][1]
        right.sharey(left)
        for offset, (key, label) in enumerate(percentiles):
            # NaN, not 0, for a scenario without the figure: no bar, and the log scale holds.
            values = [s.get(key) or math.nan for s in rows]
            right.barh([y + (offset - 1) * 0.27 for y in ys], values, height=0.27, label=label)
        right.set_xscale("log")
        right.set_xlabel(f"open loop at {doc['meta'].get('rate_per_s')} req/s, latency ms")
        right.legend(loc="lower right")
        right.tick_params(labelleft=False)
    fig.suptitle(f"resilient-ambassador bench {doc['meta']['timestamp']} ({doc['meta']['cpu_count']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def list_scenarios() -> str:
    width = max(len(s.name) for s in SCENARIOS)
    return "\n".join(f"{s.name.ljust(width)}  {s.kind:8}  {s.description}" for s in SCENARIOS)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_scenarios())
        return 0
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    started = time.monotonic()
    now = datetime.datetime.now(datetime.UTC)
    fd_limit = raise_fd_limit(2 * args.idle_connections + 1024)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta: dict[str, Any] = {
        "timestamp": now.isoformat(timespec="seconds"),
        "git": git_describe(),
        "python": platform.python_version(),
        "machine": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "connections": args.connections,
        "processes": args.processes,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeat": args.repeat,
        "rate_per_s": args.rate or None,
        "open_loop_percentiles": "hdrhistogram"
        if hdr_available()
        else "exact samples (hdrhistogram not installed)",
        "fd_limit": fd_limit,
        "target": args.target,
    }
    http_names = [n for n in args.scenario_list if BY_NAME[n].kind == "http"]
    resource_names = [n for n in args.scenario_list if BY_NAME[n].kind == "resource"]
    if args.target is not None:
        http_names, resource_names = ["target"], []
    order = run_order(http_names, args.repeat)
    runs: list[Run] = []
    resources: dict[str, Any] = {}
    notes: list[str] = []

    def progress(line: str) -> None:
        print(f"  [{time.monotonic() - started:6.1f} s] {line}", flush=True)

    with contextlib.ExitStack() as stack:
        bench = Bench(args, stack)
        meta["generator"] = bench.generator
        meta["reference_dir"] = str(bench.reference) if bench.reference else None
        meta["upstream_program"] = str(bench.upstream_program())
        print(
            f"bench: {len(order)} runs ({args.repeat} round(s), alternating) of {args.warmup:g}+"
            f"{args.duration:g} s closed loop ({bench.generator}, {args.connections} connections)"
            + (f" + open loop at {args.rate:g} req/s" if args.rate else "")
            + (f"; then {', '.join(resource_names)}" if resource_names else "")
            + f"; {usable} CPUs",
            flush=True,
        )
        if bench.reference is None:
            print("  note: bench-reference/ not found: reference-forwarder and dict-server are skipped")
        for i, (round_no, name) in enumerate(order, 1):
            run = run_target(bench, args, round_no) if name == "target" else bench.run_http(name, round_no)
            runs.append(run)
            progress(f"({i}/{len(order)}) round {round_no} {name}: {run_line(run)}")
        if resource_names:
            resources = bench.run_resources(resource_names, progress)
        if (note := bench.cleanup_redis()) is not None:
            notes.append(note)

    names = http_names
    scenarios = [summarise(n, [r for r in runs if r.name == n]) for n in names]
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    doc: dict[str, Any] = {"meta": meta, "scenarios": scenarios, "resources": resources}
    if args.target is None:
        doc["targets"] = evaluate_targets(target_values(runs, resources), per_cpu_values(runs))
    doc["warnings"] = warnings_for(runs, meta) + notes
    doc["dead_upstreams"] = bench.dead_upstreams
    doc["generator_headroom"] = generator_headroom(runs)

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(doc, indent=2) + "\n"
    (out / f"run-{stamp}.json").write_text(text)
    (out / "latest.json").write_text(text)
    (out / "latest.md").write_text(render_markdown(doc))
    plot_note = write_plot(doc, out / f"run-{stamp}.png")
    if plot_note is None and (out / f"run-{stamp}.png").exists():
        shutil.copyfile(out / f"run-{stamp}.png", out / "latest.png")

    print()
    print(render_text(doc))
    problems = problems_of(runs, resources)
    print()
    for warning in doc["warnings"]:
        print(f"warning: {warning}")
    if plot_note:
        print(f"note: {plot_note}")
    for problem in problems:
        print(f"! {problem}")
    print(f"results: {out / f'run-{stamp}.json'}, latest.json, latest.md ({meta['elapsed_s']} s)")
    return 1 if problems else 0


def run_line(run: Run) -> str:
    if run.status != "ok" or run.closed is None:
        return f"{run.status}: {run.reason}"
    c = run.closed
    line = f"{c.requests_per_s:.0f} req/s, p50 {c.percentiles_ms.get('p50', math.nan):.2f} ms"
    if run.open is not None:
        o = run.open
        line += (
            f"; open {o.rate_per_s:g}/s p50 {o.percentiles_ms.get('p50', math.nan):.2f}"
            f" p99 {o.percentiles_ms.get('p99', math.nan):.2f} ms" + (" (saturated)" if o.saturated else "")
        )
    errors = c.error_count + (run.open.error_count if run.open else 0)
    return line + (f", {errors} errors" if errors else "")


def run_target(bench: Bench, args: argparse.Namespace, round_no: int) -> Run:
    """--target: the load generator against the user's URL, nothing started."""
    host, port, path = args.target_parts
    run = Run("target", round_no)
    for rate in (0.0, args.rate) if args.rate else (0.0,):
        try:
            result = run_load(bench.spec("target", port, rate, host, path), bench.generator)
        except LoadError as exc:
            run.status, run.reason = "failed", str(exc)
            break
        if rate:
            run.open = result
        else:
            run.closed = result
    return run


def problems_of(runs: Sequence[Run], resources: dict[str, Any]) -> list[str]:
    problems = [f"{r.name} (round {r.round}): {note}" for r in runs for note in r.notes]
    problems += [f"{r.name} (round {r.round}): failed: {r.reason}" for r in runs if r.status == "failed"]
    for r in runs:
        for load in (r.closed, r.open):
            if load is not None and load.error_count:
                problems.append(
                    f"{r.name} (round {r.round}, {load.mode} loop): {load.error_count} errors {load.errors}"
                )
    soak = resources.get("soak")
    if soak and soak.get("errors"):
        problems.append(f"soak: {soak['errors']} errors")
    return problems


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the finally blocks have already stopped every server
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
