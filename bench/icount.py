"""Instructions per request, counted by callgrind: a hot-path measure the machine cannot move.

Requests per second on a shared VM swing by 10-30% from one minute to the next (other tenants,
CPU frequency, which core the scheduler picks), so a 3% change to the hot path cannot be seen
in `run.py`'s ratios without many rounds. Valgrind's callgrind counts the instructions a process
executes, whatever else the machine is doing: two runs of the same code agree to within about
3% (the daemon's access-log flushes and timers fall differently), where req/s moves by 30%.
This runs each server under callgrind twice, serving N1 and then N2 requests over one
keep-alive connection, and reports (Ir(N2) - Ir(N1)) / (N2 - N1): start-up, imports
and shutdown cancel out. Only user-space instructions are counted (not the kernel's socket
work, about a fifth of the CPU a request costs), and instructions are not cycles (cache
misses are not seen), so the ratios here are a floor-to-ceiling guide for `run.py`'s, not a
substitute. Needs `valgrind` (Debian's package); each server runs about 50x slower under it,
so the whole run takes a few minutes.

Usage: .venv/bin/python bench/icount.py [--scenarios daemon-1k,cache-memory,...] [--requests 200,900]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from servers import LOOPBACK, daemon_argv, start_server

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_REFERENCE_DIR = BENCH_DIR.parent.parent / "shared" / "bench-reference"
VALGRIND_READY_TIMEOUT_S = 180.0  # the interpreter starts about 50x slower under callgrind
VALGRIND_STOP_TIMEOUT_S = 120.0
_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Scenario:
    name: str
    unique_paths: bool  # a path per request (a real cache miss each time) or one path
    what: str


SCENARIOS = (
    Scenario("daemon-1k", True, "daemon pass-through, default policies, memory cache on and missing"),
    Scenario("cache-memory", False, "daemon answering from the memory cache"),
    Scenario("reference-forwarder", True, "bench-reference minimal_forwarder.py"),
    Scenario("dict-server", False, "bench-reference dict_server.py"),
)
BY_NAME = {s.name: s for s in SCENARIOS}
# Each ratio: the reference's instructions per request over the daemon's (higher is better).
RATIOS = (("reference-forwarder", "daemon-1k"), ("dict-server", "cache-memory"))


def request_bytes(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nUser-Agent: icount\r\n\r\n".encode()


def send_requests(port: int, count: int, unique_paths: bool) -> None:
    """`count` GETs, one at a time, on one keep-alive connection (a new one if the server
    closes it); each response is read whole (Content-Length framing) before the next."""
    sock = socket.create_connection((LOOPBACK, port))
    pending = b""
    try:
        for n in range(count):
            sock.sendall(request_bytes(f"/icount/{n}" if unique_paths else "/icount"))
            while True:
                end = pending.find(b"\r\n\r\n")
                if end >= 0:
                    head = pending[:end].lower()
                    length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                    if len(pending) >= end + 4 + length:
                        if not head.startswith(b"http/1.1 200"):
                            raise RuntimeError(f"unexpected response: {head[:60]!r}")
                        closing = b"connection: close" in head
                        pending = pending[end + 4 + length :]
                        break
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("the server closed the connection mid-response")
                pending += data
            if closing:
                sock.close()
                sock = socket.create_connection((LOOPBACK, port))
    finally:
        sock.close()


def instructions(
    name: str, argv_for_port: Callable[[int], Sequence[str]], requests: int, unique: bool, scratch: Path
) -> int:
    """Instructions the server process executed from start to exit, serving `requests`."""
    out = scratch / f"{name}-{requests}.callgrind"
    server = start_server(
        name,
        lambda port: ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv_for_port(port)],
        timeout_s=VALGRIND_READY_TIMEOUT_S,
    )
    try:
        send_requests(server.port, requests, unique)
        code = server.stop(VALGRIND_STOP_TIMEOUT_S)
        if code not in (0, -signal.SIGTERM):  # the reference programs just die of the SIGTERM
            raise RuntimeError(f"{name} exited {code}:\n{server.stderr_text()[-2000:]}")
    finally:
        server.close()
    match = _TOTALS.search(out.read_bytes())
    if match is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(match.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS))
    parser.add_argument(
        "--requests", default="200,900", help="N1,N2 (N2 below the daemon's 1,000 per connection)"
    )
    parser.add_argument("--reference-dir", type=Path, default=DEFAULT_REFERENCE_DIR)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("icount: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    small, large = (int(n) for n in args.requests.split(","))
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not 0 < small < large:
        parser.error(
            f"unknown scenarios {unknown}" if unknown else "--requests: expected N1,N2 with 0 < N1 < N2"
        )
    upstream = start_server(
        "upstream",
        lambda port: [sys.executable, str(BENCH_DIR / "canned_upstream.py"), "--listen", str(port)],
    )
    up_url = f"http://{LOOPBACK}:{upstream.port}"
    programs: dict[str, Callable[[int], Sequence[str]]] = {
        "daemon-1k": daemon_argv(up_url, "--cache"),
        "cache-memory": daemon_argv(up_url, "--cache-ttl", "1h"),
        "reference-forwarder": lambda port: [
            sys.executable,
            str(args.reference_dir / "minimal_forwarder.py"),
            "--listen",
            str(port),
            "--upstream",
            f"{LOOPBACK}:{upstream.port}",
        ],
        "dict-server": lambda port: [
            sys.executable,
            str(args.reference_dir / "dict_server.py"),
            "--listen",
            str(port),
            "--size",
            "1024",
        ],
    }
    per_request: dict[str, float] = {}
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="icount-") as scratch:
            for name in names:
                scenario = BY_NAME[name]
                if name in ("reference-forwarder", "dict-server") and not args.reference_dir.is_dir():
                    print(f"  {name}: skipped ({args.reference_dir} not found)", file=sys.stderr)
                    continue
                counts = [
                    instructions(name, programs[name], n, scenario.unique_paths, Path(scratch))
                    for n in (small, large)
                ]
                per_request[name] = (counts[1] - counts[0]) / (large - small)
                elapsed = time.monotonic() - started
                print(
                    f"  [{elapsed:6.1f} s] {name}: {per_request[name]:,.0f} instructions/request",
                    file=sys.stderr,
                )
    finally:
        upstream.stop()
        upstream.close()
    print(f"\n{'scenario':<22}{'instructions/request':>22}  what")
    for name in names:
        if name in per_request:
            print(f"{name:<22}{per_request[name]:>22,.0f}  {BY_NAME[name].what}")
    ratios = {
        f"{ref}/{ours}": per_request[ref] / per_request[ours]
        for ref, ours in RATIOS
        if ref in per_request and ours in per_request
    }
    for label, value in ratios.items():
        print(f"{label:<40} {value:5.2f}x fewer instructions per request")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "icount-latest.json").write_text(
        json.dumps(
            {"requests": [small, large], "instructions_per_request": per_request, "ratios": ratios}, indent=2
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
