"""TCP relay benchmark: bulk throughput (MB/s) and small keep-alive HTTP exchanges (req/s),
direct vs through resilient-ambassador's tcp listener vs through socat, in one run.

  direct     client -> upstream                                   (the ceiling of client and upstream)
  relay      client -> resilient-ambassador (--upstream tcp://) -> upstream  (the system under test)
  socat      client -> socat TCP-LISTEN:P,fork TCP:upstream -> upstream      (socat's default 8 KiB buffer)
  socat-64k  the same with socat -b 65536 (the relay's chunk size)           (socat paths: when installed)

The forwarder is pinned to one core and everything else to the others (--no-pin: not), so
the one-process relay and socat's process per connection get the same CPU.
Bulk: --bulk-mib MiB per transfer, download (upstream -> client) and upload (client -> upstream)
separately, against bench/bulk_upstream.py; each path runs --rounds times in alternating order
and the median is shown, with the forwarder's CPU seconds per GB relayed (socat's children
included). HTTP: the closed-loop load generator of bench/loadgen.py (wrk when installed) with
--connections keep-alive connections against bench/canned_upstream.py, --duration seconds per
path and round, with the forwarder's CPU microseconds per request. The relay/other ratios are
taken per round (paths of one round run back to back) and summarised as median [min-max]:
on a shared VM the machine's speed drifts between rounds far more than within one. Results also go to
bench/results/relay.json. See bench/README.md.

Usage: .venv/bin/python bench/relay.py [--bulk-mib 512] [--rounds 3] [--duration 5] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from loadgen import LoadSpec, run_load, wrk_path
from servers import LOOPBACK, ServerProcess, can_pin, daemon_argv, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
DEFAULT_JSON = BENCH_DIR / "results" / "relay.json"
BUFFER_BYTES = 1 << 20
MB = 1_000_000


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bulk-mib", type=int, default=512, help="MiB per bulk transfer (default 512)")
    parser.add_argument("--rounds", type=int, default=3, help="bulk rounds per path (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="HTTP load seconds per path (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--processes", type=int, default=1, help="load generator processes (default 1)")
    parser.add_argument("--size", type=int, default=1024, help="HTTP response body bytes (default 1024)")
    parser.add_argument(
        "--paths",
        default="direct,relay,socat,socat-64k",
        help="comma-separated subset of direct, relay, socat (default 8 KiB buffer), socat-64k (-b 65536)",
    )
    parser.add_argument("--quick", action="store_true", help="64 MiB, 1 round, 2 s of HTTP load")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the forwarder to one core (and everything else to the others)",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.quick:
        args.bulk_mib, args.rounds, args.duration, args.warmup = 64, 1, 2.0, 0.5
    args.path_list = [p for p in args.paths.split(",") if p]
    return args


def _daemon(upstream_port: int) -> Callable[[int], list[str]]:
    return daemon_argv(f"tcp://{LOOPBACK}:{upstream_port}")


def _socat(upstream_port: int, buffer_bytes: int | None) -> Callable[[int], list[str]]:
    return lambda port: [
        "socat",
        *(["-b", str(buffer_bytes)] if buffer_bytes else []),
        f"TCP-LISTEN:{port},bind={LOOPBACK},fork,reuseaddr,backlog=1024",
        f"TCP:{LOOPBACK}:{upstream_port}",
    ]


# (forwarder CPUs, everything else's CPUs), or None when not pinning.
CPUS: tuple[set[int], set[int]] | None = None


def split_cpus() -> tuple[set[int], set[int]] | None:
    """The forwarder gets the last usable core, the clients and upstreams the rest: the relay
    is one process and socat forks one per connection, so unpinned socat would use every core
    while the relay uses one. Pinned, both get one core: a per-core comparison."""
    if not can_pin():
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


@contextlib.contextmanager
def forwarder(path: str, upstream: ServerProcess) -> Iterator[ServerProcess | None]:
    """The process between client and upstream for `path` (None for direct)."""
    if path == "direct":
        yield None
        return
    if path == "relay":
        argv = _daemon(upstream.port)
    else:  # "socat" (its default 8 KiB buffer, as people run it) or "socat-64k" (-b 65536)
        argv = _socat(upstream.port, 65536 if path == "socat-64k" else None)
    server = start_server(f"{path}-{upstream.name}", argv, cpus=CPUS[0] if CPUS else None)
    try:
        yield server
    finally:
        server.close()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def download(port: int, size: int) -> float:
    """Seconds to receive `size` bytes sent by the upstream."""
    buffer = bytearray(BUFFER_BYTES)
    with _connect(port) as sock:
        started = time.perf_counter()
        sock.sendall(b"D" + struct.pack(">Q", size))
        got = 0
        while n := sock.recv_into(buffer):
            got += n
        elapsed = time.perf_counter() - started
    if got != size:
        raise RuntimeError(f"download got {got} of {size} bytes")
    return elapsed


def upload(port: int, size: int) -> float:
    """Seconds to send `size` bytes and hear from the upstream that all of them arrived."""
    payload = memoryview(bytes(BUFFER_BYTES))
    with _connect(port) as sock:
        started = time.perf_counter()
        sock.sendall(b"U" + bytes(8))
        left = size
        while left > 0:
            step = min(left, BUFFER_BYTES)
            sock.sendall(payload[:step])
            left -= step
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 8 and (chunk := sock.recv(8 - len(reply))):
            reply += chunk
        elapsed = time.perf_counter() - started
    (got,) = struct.unpack(">Q", reply)
    if got != size:
        raise RuntimeError(f"upload delivered {got} of {size} bytes")
    return elapsed


def tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live children (socat forks one per
    connection), plus what its exited children used (Linux /proc; None elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    found = False
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # fields from 3 (state) on
        if int(entry) == pid:
            found = True
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        elif int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks if found else None


class CpuMeter:
    """The forwarder's CPU seconds between `start` and `stop` (None for direct)."""

    def __init__(self, server: ServerProcess | None) -> None:
        self._pid = server.pid if server is not None else None
        self._start: float | None = None
        self.cpu_s: float | None = None

    def start(self) -> None:
        self._start = tree_cpu_s(self._pid) if self._pid is not None else None

    def stop(self) -> None:
        end = tree_cpu_s(self._pid) if self._pid is not None else None
        if self._start is not None and end is not None:
            self.cpu_s = end - self._start


Rounds = dict[str, list[dict[str, float | None]]]  # path -> one dict of figures per round


def _order(paths: list[str], round_no: int) -> list[str]:
    """Forward, then reversed, then forward: a drift over the run reaches every path alike."""
    return paths if round_no % 2 == 0 else list(reversed(paths))


def bulk(args: argparse.Namespace, upstream: ServerProcess) -> Rounds:
    size = args.bulk_mib * 1024 * 1024
    rounds: Rounds = {p: [] for p in args.path_list}
    for round_no in range(args.rounds):
        for path in _order(args.path_list, round_no):
            with forwarder(path, upstream) as fwd:
                port = fwd.port if fwd is not None else upstream.port
                download(port, 1 << 20)  # warm the path (and the daemon's imports) up
                meter = CpuMeter(fwd)
                meter.start()
                down_s = download(port, size)
                up_s = upload(port, size)
                meter.stop()
            figures = {
                "download": size / down_s / MB,
                "upload": size / up_s / MB,
                "cpu_s_per_gb": meter.cpu_s / (2 * size / 1e9) if meter.cpu_s is not None else None,
            }
            rounds[path].append(figures)
            print(
                f"  bulk round {round_no + 1} {path:<9} download {figures['download']:8.0f} MB/s  "
                f"upload {figures['upload']:8.0f} MB/s",
                flush=True,
            )
    return rounds


def http(args: argparse.Namespace, upstream: ServerProcess, generator: str) -> Rounds:
    rounds: Rounds = {p: [] for p in args.path_list}
    for round_no in range(args.rounds):
        for path in _order(args.path_list, round_no):
            with forwarder(path, upstream) as fwd:
                port = fwd.port if fwd is not None else upstream.port
                spec = LoadSpec(
                    host=LOOPBACK,
                    port=port,
                    connections=args.connections,
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    processes=args.processes,
                )
                meter = CpuMeter(fwd)
                result = run_load(spec, "wrk" if generator == "wrk" else "builtin", meter.start, meter.stop)
            figures = {
                "requests_per_s": result.requests_per_s,
                "p50_ms": result.percentiles_ms.get("p50"),
                "p99_ms": result.percentiles_ms.get("p99"),
                "errors": float(result.error_count),
                "cpu_us_per_request": meter.cpu_s / result.requests * 1e6
                if meter.cpu_s is not None and result.requests
                else None,
            }
            rounds[path].append(figures)
            print(
                f"  http round {round_no + 1} {path:<9} {result.requests_per_s:9.0f} req/s  "
                f"p50 {figures['p50_ms'] or 0:.2f} ms  p99 {figures['p99_ms'] or 0:.2f} ms  "
                f"errors {result.error_count}",
                flush=True,
            )
    return rounds


def medians(rounds: Rounds) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for path, per_round in rounds.items():
        keys = per_round[0].keys() if per_round else ()
        out[path] = {}
        for key in keys:
            values = [value for r in per_round if (value := r[key]) is not None]
            out[path][key] = round(statistics.median(values), 3) if values else None
    return out


def paired_ratio(rounds: Rounds, key: str, mine: str, other: str) -> dict[str, float] | None:
    """relay/other per round (the two ran minutes apart at most): median, min, max."""
    ratios = [
        x / y
        for a, b in zip(rounds.get(mine, []), rounds.get(other, []), strict=False)
        if (x := a[key]) and (y := b[key])
    ]
    if not ratios:
        return None
    return {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


def render(doc: dict[str, Any]) -> str:
    lines = [
        "",
        "medians over the rounds:",
        f"{'path':<10}{'download MB/s':>15}{'upload MB/s':>13}{'CPU s/GB':>10}"
        f"{'HTTP req/s':>12}{'p50 ms':>8}{'p99 ms':>8}{'CPU us/req':>12}",
    ]

    def f(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for path in doc["paths"]:
        b, h = doc["bulk"].get(path, {}), doc["http"].get(path, {})
        lines.append(
            f"{path:<10}{f(b.get('download')):>15}{f(b.get('upload')):>13}{f(b.get('cpu_s_per_gb'), 2):>10}"
            f"{f(h.get('requests_per_s')):>12}{f(h.get('p50_ms'), 2):>8}{f(h.get('p99_ms'), 2):>8}"
            f"{f(h.get('cpu_us_per_request'), 1):>12}"
        )
    lines.append("relay / other, per round (median [min-max]):")
    for other, ratios in doc["ratios"].items():
        parts = [
            f"{label} {r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"
            for label, r in ratios.items()
            if r is not None
        ]
        lines.append(f"  relay/{other}: " + "  ".join(parts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    os.environ.update(env)
    if shutil.which("socat") is None and any(p.startswith("socat") for p in args.path_list):
        print("  socat is not installed: skipping it (apt-get install socat to compare)")
        args.path_list = [p for p in args.path_list if not p.startswith("socat")]
    global CPUS
    CPUS = None if args.no_pin else split_cpus()
    if CPUS is not None:
        os.sched_setaffinity(0, CPUS[1])  # this process, its load generators and the upstreams
    generator = "wrk" if wrk_path() else "builtin"
    print(
        f"relay: bulk {args.bulk_mib} MiB x {args.rounds} rounds; HTTP {args.size} B bodies, "
        f"{args.connections} keep-alive connections, {args.duration:g} s, generator {generator}; "
        f"paths {', '.join(args.path_list)}; "
        + (f"forwarder pinned to CPU {sorted(CPUS[0])}" if CPUS else "not pinned"),
        flush=True,
    )
    bulk_upstream = start_server(
        "bulk", lambda port: [sys.executable, str(BENCH_DIR / "bulk_upstream.py"), "--listen", str(port)]
    )
    http_upstream = start_server(
        "http",
        lambda port: [
            sys.executable,
            str(BENCH_DIR / "canned_upstream.py"),
            "--listen",
            str(port),
            "--size",
            str(args.size),
        ],
    )
    try:
        doc: dict[str, Any] = {
            "benchmark": "relay",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": list(os.getloadavg()),
            "bulk_mib": args.bulk_mib,
            "rounds": args.rounds,
            "connections": args.connections,
            "size_bytes": args.size,
            "generator": generator,
            "paths": args.path_list,
            "pinned": {"forwarder": sorted(CPUS[0]), "others": sorted(CPUS[1])} if CPUS else None,
        }
        bulk_rounds = bulk(args, bulk_upstream)
        http_rounds = http(args, http_upstream, generator)
        doc["bulk"], doc["http"] = medians(bulk_rounds), medians(http_rounds)
        doc["ratios"] = {
            other: {
                "download": paired_ratio(bulk_rounds, "download", "relay", other),
                "upload": paired_ratio(bulk_rounds, "upload", "relay", other),
                "HTTP req/s": paired_ratio(http_rounds, "requests_per_s", "relay", other),
            }
            for other in args.path_list
            if other != "relay" and "relay" in args.path_list
        }
        doc["rounds"] = {"bulk": bulk_rounds, "http": http_rounds}
    finally:
        bulk_upstream.close()
        http_upstream.close()
    print(render(doc))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
