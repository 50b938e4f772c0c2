"""A bounded soak: the daemon (a subprocess, as deployed) under mixed traffic while faults are
switched on and off, on loopback only. Leaks are bugs: it reports requests, errors by reason,
and the daemon's RSS, open file descriptors and live trio tasks at start and end.

    .venv/bin/python bench/soak.py                 # 60 s
    .venv/bin/python bench/soak.py --minutes 3     # what bench/README.md reports
    .venv/bin/python bench/soak.py --json out.json

    client workers -> daemon (subprocess) -> fault proxy -> fake upstream (this process)

The fake upstream and the fault proxy are the test suite's (tests/support). Faults rotate every
`--phase-s`: clean, latency with jitter, a 503 storm with Retry-After, resets mid-body, garbage
responses, a blackhole for new connections plus answers slower than the response timeout, a
byte-dripping link, and the upstream closing or resetting pooled connections. The traffic
mixes keep-alive GETs, POSTs with bodies, HEADs, clients that vanish mid-response, smuggling
attempts and half-sent heads.

Start and end figures are taken the same way: traffic stopped, every client connection
closed, the upstream's idle connections closed, a short settle. The injected credential is a
canary: any response that contains it is counted (it must stay 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio
from servers import LOOPBACK, ServerProcess, free_port, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # tests.support: the fake upstream and the fault proxy

from tests.support.client import HttpClient, RawConnection, http_request  # noqa: E402
from tests.support.fault_proxy import FaultProxy, start_fault_proxy  # noqa: E402
from tests.support.upstream import FakeUpstream, Received, Reply, start_fake_upstream  # noqa: E402

CANARY = "soak-canary-9d2f71"
PHASES = ("clean", "latency", "storm503", "resets", "garbage", "blackhole", "drip", "idle_close")
REQUEST_TIMEOUT_S = 10.0
SETTLE_S = 2.0

CONFIG = """\
listeners:
  - name: main
    listen: {listen}
    limits: {{header_read_timeout: 2s, body_read_timeout: 5s, send_timeout: 5s}}
    routes:
      - upstream: up
        timeout: 3s
        retry: {{retries: 1}}
upstreams:
  up:
    url: http://{proxy}
    timeouts: {{connect: 1s, response: 1s, read_idle: 2s}}
    breaker: {{failure_threshold: 5, reset_timeout: 2s, min_requests: 10}}
    headers: {{X-Api-Key: "${{SOAK_KEY}}"}}
admin:
  listen: {admin}
access_log:
  enabled: false
"""


@dataclass
class Tally:
    requests: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    # x-ambassador-error reasons of the daemon's own answers, and client-side failures
    # ("client:<exception>") such as a connection aborted mid-body.
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    canary_leaks: int = 0


@dataclass
class Sample:
    at_s: float
    rss_kib: int | None
    fds: int | None
    tasks: int | None
    open_connections: int | None
    pool_idle: int | None
    pool_in_use: int | None
    breaker: str | None
    requests: int


def _fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.phase = "clean"
        self.phases_run: list[str] = []
        self.upstream: FakeUpstream | None = None
        self.proxy: FaultProxy | None = None
        self.daemon: ServerProcess | None = None
        self.admin_port = 0
        self.started = time.monotonic()

    # -- the upstream side -----------------------------------------------------------------

    def reply(self, _received: Received) -> Reply:
        roll = self.rng.random()
        size = self.rng.choice((0, 200, 2000, 16_000))
        body: bytes | list[bytes] = b"x" * size
        if self.rng.random() < 0.3:
            body = [b"y" * 1000] * self.rng.randint(1, 8)  # chunked
        if self.phase == "storm503" and roll < 0.7:
            return Reply(status=503, headers=[("retry-after", "1")], body=b"overloaded")
        if self.phase == "resets" and roll < 0.2:
            return Reply(body=b"z" * 20_000, reset_after_head=True)
        if self.phase == "garbage" and roll < 0.2:
            junk = self.rng.choice([b"HTTP/1.1 2OO OK\r\n\r\n", bytes(self.rng.randbytes(64)) + b"\r\n\r\n"])
            return Reply(raw=junk, close_after=self.rng.random() < 0.5)
        if self.phase == "blackhole" and roll < 0.1:
            return Reply(delay_s=1.5, body=b"late")  # past the 1 s response timeout
        return Reply(body=body)

    def apply_phase(self, phase: str) -> None:
        assert self.proxy is not None
        self.phase = phase
        self.phases_run.append(phase)
        self.proxy.clear()
        if phase == "latency":
            self.proxy.downstream.latency_s = 0.05
            self.proxy.downstream.jitter_s = 0.04
        elif phase == "blackhole":
            self.proxy.blackhole = True  # pooled connections still work; new ones go nowhere
        elif phase == "drip":
            self.proxy.downstream.slice_bytes = 256
            self.proxy.downstream.slice_delay_s = 0.001

    async def idle_closer(self) -> None:
        """In the idle_close phase: the upstream drops pooled connections, by FIN or RST."""
        assert self.upstream is not None
        assert self.proxy is not None
        while True:
            await trio.sleep(0.3)
            if self.phase == "idle_close":
                await self.upstream.close_idle_connections(reset=self.rng.random() < 0.5)
                if self.rng.random() < 0.2:
                    self.proxy.cut_all(reset=True)  # and sometimes everything, mid-flight

    # -- the client side -------------------------------------------------------------------

    def count(self, status: int, reason: str | None, data: bytes = b"") -> None:
        self.tally.requests += 1
        self.tally.statuses[status] += 1
        if reason:
            self.tally.reasons[reason] += 1
        if CANARY.encode() in data:
            self.tally.canary_leaks += 1

    async def worker(self, port: int, seed: int) -> None:
        rng = random.Random(seed)
        kinds = ["get", "post", "head", "abort", "smuggle", "half_head"]
        weights = [70, 14, 6, 5, 3, 2]
        clients: list[HttpClient] = []  # the keep-alive connection, when one is open
        try:
            while True:
                try:
                    await self._one(port, rng, rng.choices(kinds, weights)[0], clients)
                except (
                    trio.TooSlowError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    OSError,
                ) as exc:
                    self.count(0, f"client:{type(exc).__name__}")
                    await _drop(clients)
                except h11.RemoteProtocolError:
                    self.count(0, "client:aborted_mid_response")  # the only safe way to fail mid-body
                    await _drop(clients)
        finally:
            await _drop(clients)  # even when cancelled: HttpClient.close is aclose_forcefully

    async def _one(self, port: int, rng: random.Random, kind: str, clients: list[HttpClient]) -> None:
        if kind in ("get", "post", "head"):
            if clients and not clients[0].reusable:
                await _drop(clients)
            if not clients:
                clients.append(await HttpClient.connect(port, timeout_s=REQUEST_TIMEOUT_S))
            body = b"p" * rng.choice((10, 1000, 4000)) if kind == "post" else b""
            response = await clients[0].request(kind.upper(), f"/items/{rng.randint(1, 50)}", body=body)
            raw_headers = b"".join(n + b":" + v for n, v in response.headers)
            self.count(response.status, response.header("x-ambassador-error"), raw_headers + response.body)
        elif kind == "abort":
            async with await RawConnection.connect(port) as conn:
                await conn.send(b"GET /abort HTTP/1.1\r\nHost: a\r\n\r\n")
                await conn.receive_some(timeout_s=REQUEST_TIMEOUT_S)
            self.count(0, "client:gone_mid_response")
        elif kind == "smuggle":
            async with await RawConnection.connect(port) as conn:
                await conn.send(
                    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                )
                read = await conn.receive_until_closed(timeout_s=REQUEST_TIMEOUT_S)
            status = int(read.data[9:12]) if read.data.startswith(b"HTTP/1.1 ") else 0
            self.count(status, "bad_request" if status == 400 else f"client:smuggle_{read.ending}")
        else:
            async with await RawConnection.connect(port) as conn:
                await conn.send(b"GET /half HTTP/1.1\r\nHost: a\r\n")
                await trio.sleep(0.2)
            self.count(0, "client:half_head_abandoned")

    # -- measuring -------------------------------------------------------------------------

    async def sample(self) -> Sample:
        assert self.daemon is not None
        stats: dict[str, Any] = {}
        try:
            response = await http_request(self.admin_port, "GET", "/stats", timeout_s=5)
            stats = json.loads(response.body)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError):
            pass
        listener = stats.get("listeners", {}).get("main", {})
        pool = stats.get("upstreams", {}).get("up", {})
        return Sample(
            at_s=round(time.monotonic() - self.started, 1),
            rss_kib=self.daemon.rss_kib(),
            fds=_fd_count(self.daemon.pid),
            tasks=stats.get("tasks"),
            open_connections=listener.get("open_connections"),
            pool_idle=pool.get("idle"),
            pool_in_use=pool.get("in_use"),
            breaker=stats.get("breakers", {}).get("up", {}).get("state"),
            requests=self.tally.requests,
        )

    async def quiesced_sample(self) -> Sample:
        """Traffic stopped, client connections closed: settle, empty the pool, settle, sample."""
        assert self.upstream is not None
        assert self.proxy is not None
        self.proxy.clear()
        self.phase = "clean"
        await trio.sleep(SETTLE_S)
        await self.upstream.close_idle_connections()
        await trio.sleep(SETTLE_S)
        return await self.sample()

    async def traffic(self, port: int, seconds: float, *, phases: bool) -> None:
        async with trio.open_nursery() as nursery:
            for index in range(self.args.concurrency):
                nursery.start_soon(self.worker, port, self.args.seed * 1000 + index + len(self.phases_run))
            if phases:
                nursery.start_soon(self.idle_closer)
                deadline = trio.current_time() + seconds
                index = 0
                while trio.current_time() < deadline:
                    self.apply_phase(PHASES[index % len(PHASES)])
                    index += 1
                    await trio.sleep(min(self.args.phase_s, max(0.0, deadline - trio.current_time())))
                    print(f"  {_fmt_sample(await self.sample())}  phase={self.phase}", flush=True)
            else:
                await trio.sleep(seconds)
            nursery.cancel_scope.cancel()

    async def run(self) -> dict[str, Any]:
        async with trio.open_nursery() as nursery:
            self.upstream = await start_fake_upstream(nursery, default=self.reply)
            self.proxy = await start_fault_proxy(nursery, LOOPBACK, self.upstream.port, seed=self.args.seed)
            self.daemon = await trio.to_thread.run_sync(self._start_daemon)
            try:
                print(f"warm-up {self.args.warmup_s:g} s of clean traffic", flush=True)
                await self.traffic(self.daemon.port, self.args.warmup_s, phases=False)
                start = await self.quiesced_sample()
                print(f"start: {_fmt_sample(start)}", flush=True)
                warm_requests = self.tally.requests
                self.tally = Tally()
                self.started = time.monotonic()
                await self.traffic(self.daemon.port, self.args.minutes * 60, phases=True)
                duration_s = time.monotonic() - self.started
                end = await self.quiesced_sample()
                print(f"end:   {_fmt_sample(end)}", flush=True)
                alive = self.daemon.alive()
            finally:
                exit_code = await trio.to_thread.run_sync(self.daemon.stop)
                stderr = self.daemon.stderr_text()
                self.daemon.close()
            nursery.cancel_scope.cancel()
        return {
            "duration_s": round(duration_s, 1),
            "warmup_requests": warm_requests,
            "requests": self.tally.requests,
            "requests_per_s": round(self.tally.requests / duration_s, 1),
            "statuses": dict(sorted(self.tally.statuses.items())),
            "reasons": dict(self.tally.reasons.most_common()),
            "canary_leaks": self.tally.canary_leaks,
            "phases": len(self.phases_run),
            "start": start.__dict__,
            "end": end.__dict__,
            "daemon_alive_at_end": alive,
            "daemon_exit_code": exit_code,
            "daemon_stderr_errors": [line for line in stderr.splitlines() if "ERROR" in line][:20],
            "upstream_connections": len(self.upstream.connections) if self.upstream else 0,
        }

    def _start_daemon(self) -> ServerProcess:
        admin = free_port()
        self.admin_port = admin
        directory = Path(tempfile.mkdtemp(prefix="soak-"))

        def argv(port: int) -> list[str]:
            assert self.proxy is not None
            path = directory / "config.yaml"
            path.write_text(
                CONFIG.format(
                    listen=f"{LOOPBACK}:{port}",
                    proxy=f"{LOOPBACK}:{self.proxy.port}",
                    admin=f"{LOOPBACK}:{admin}",
                )
            )
            return [
                sys.executable,
                "-m",
                "resilient_ambassador",
                "run",
                "--config",
                str(path),
                "--log-level",
                "warning",
            ]

        os.environ["SOAK_KEY"] = CANARY
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
        )
        return start_server("daemon", argv)


async def _drop(clients: list[HttpClient]) -> None:
    while clients:
        await clients.pop().close()


def _fmt_sample(sample: Sample) -> str:
    rss = f"{sample.rss_kib / 1024:.1f} MiB" if sample.rss_kib is not None else "?"
    return (
        f"t={sample.at_s:>6}s requests={sample.requests:>7} rss={rss} fds={sample.fds} tasks={sample.tasks} "
        f"client_conns={sample.open_connections} pool_idle={sample.pool_idle} "
        f"pool_in_use={sample.pool_in_use} breaker={sample.breaker}"
    )


def verdict(doc: dict[str, Any]) -> list[str]:
    """What looks like a leak or a failure (empty: none)."""
    start, end = doc["start"], doc["end"]
    problems = []
    if not doc["daemon_alive_at_end"]:
        problems.append("the daemon died")
    if doc["canary_leaks"]:
        problems.append(f"the injected credential reached a client {doc['canary_leaks']} times")
    if None not in (start["tasks"], end["tasks"]) and end["tasks"] > start["tasks"]:
        problems.append(f"tasks {start['tasks']} -> {end['tasks']}")
    if None not in (start["fds"], end["fds"]):
        # Idle pooled connections are fds the daemon may keep; compare without them.
        grown = (end["fds"] - (end["pool_idle"] or 0)) - (start["fds"] - (start["pool_idle"] or 0))
        if grown > 0:
            problems.append(f"open fds (pool excluded) grew by {grown}")
    if None not in (start["open_connections"], end["open_connections"]) and end["open_connections"]:
        problems.append(f"{end['open_connections']} client connections still open")
    if end["breaker"] == "half-open":
        problems.append("breaker stuck half-open")
    if doc["daemon_stderr_errors"]:
        problems.append("errors logged")
    return problems


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=1.0, help="length of the faulty part (default 1)")
    parser.add_argument("--phase-s", type=float, default=8.0, help="seconds per fault phase (default 8)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="clean traffic before the start sample")
    parser.add_argument("--concurrency", type=int, default=8, help="client workers (default 8)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    doc = trio.run(Soak(args).run)
    problems = verdict(doc)
    doc["problems"] = problems
    print(json.dumps(doc, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print("OK: no leak seen" if not problems else "PROBLEMS: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
