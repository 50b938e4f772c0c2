"""Closed-loop HTTP/1.1 keep-alive load generators: `wrk` when installed, else a built-in one.

Both answer the same question: with C keep-alive connections, each sending its next GET as
soon as the previous response has fully arrived, how many requests per second complete, and
how long does each take (send of the request to the last byte of the response)?

The built-in generator is written to be cheap per request, so that it can drive a fast
upstream well above the rate of the system under test: several processes, each running an
event loop (`selectors`, epoll on Linux) over plain non-blocking sockets. Responses are framed
by `content-length` only (no HTTP parser: h11 costs more per response than the proxies being
measured); a response framed any other way counts as an error. Latencies are kept in arrays
and merged in the parent, so percentiles are exact, not histogram buckets.

Errors are counted over the whole run, warm-up included: a benchmark that fails during
warm-up has still failed.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import selectors
import shutil
import signal
import socket
import subprocess
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Literal, cast, final

RECV_BUFFER_BYTES = 256 * 1024
# Same order as h11's default: a response head bigger than this is a bug, not a benchmark.
MAX_HEAD_BYTES = 64 * 1024
# How often the built-in generator looks for requests older than the per-request timeout.
TIMEOUT_SCAN_INTERVAL_S = 0.1
CONNECT_TIMEOUT_S = 5.0

ERROR_KINDS = ("connect", "eof", "reset", "timeout", "status", "framing")

GeneratorName = Literal["builtin", "wrk"]
# What one load process sends back: requests completed in the window, their latencies, errors,
# and how many times a `Connection: close` from the server made it reconnect.
WorkerResult = tuple[int, "array[float]", dict[str, int], int]


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    connections: int
    duration_s: float
    warmup_s: float
    processes: int
    timeout_s: float = 5.0
    path: str = "/bench"


@dataclass
class LoadResult:
    generator: GeneratorName
    requests: int  # completed inside the measured window
    measured_s: float
    latencies_s: list[float] | None  # exact samples (built-in); None when only percentiles are known
    percentiles_ms: dict[str, float]  # keys "p50", "p90", "p99" (and "max" when known)
    errors: dict[str, int] = field(default_factory=dict)
    reconnects: int | None = None  # after `Connection: close`; wrk does them but does not count them

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.measured_s if self.measured_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class LoadError(RuntimeError):
    """The load generator itself failed (not the server: server failures are counted errors)."""


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(math.ceil(pct / 100.0 * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def summarise_latencies(latencies_s: Sequence[float]) -> dict[str, float]:
    ordered = sorted(latencies_s)
    result = {f"p{p}": percentile(ordered, p) * 1000.0 for p in (50, 90, 99)}
    result["max"] = ordered[-1] * 1000.0 if ordered else math.nan
    return result


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_load(
    spec: LoadSpec,
    generator: GeneratorName,
    on_measure_start: Callable[[], None] | None = None,
    on_measure_end: Callable[[], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> LoadResult:
    """Run one closed-loop load; `on_measure_start` and `on_measure_end` bracket the measured
    window (for CPU sampling). `on_ready` is called once the generator is set up, right before
    the warm-up starts: loads run at the same time can wait for each other there, so that
    their warm-ups, and so their measured windows, start together."""
    if generator == "wrk":
        return _run_wrk(spec, on_measure_start, on_measure_end, on_ready)
    return _run_builtin(spec, on_measure_start, on_measure_end, on_ready)


# --- wrk ----------------------------------------------------------------------------------

_WRK_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_WRK_PCT = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_WRK_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.MULTILINE)
_WRK_LATENCY_MAX = re.compile(r"^\s*Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m|h)\s", re.MULTILINE)
_WRK_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk_output(text: str) -> LoadResult:
    """Parse `wrk --latency` output. wrk's socket "read" errors are resets or EOFs."""
    found = _WRK_REQUESTS.search(text)
    if found is None:
        raise LoadError(f"unexpected wrk output:\n{text}")
    requests = int(found.group(1))
    measured_s = float(found.group(2)) * _WRK_UNITS_S[found.group(3)]
    percentiles = {
        f"p{m.group(1)}": float(m.group(2)) * _WRK_UNITS_S[m.group(3)] * 1000.0
        for m in _WRK_PCT.finditer(text)
    }
    latency_max = _WRK_LATENCY_MAX.search(text)
    if latency_max is not None:
        percentiles["max"] = float(latency_max.group(1)) * _WRK_UNITS_S[latency_max.group(2)] * 1000.0
    errors = dict.fromkeys(ERROR_KINDS, 0)
    socket_errors = _WRK_SOCKET_ERRORS.search(text)
    if socket_errors is not None:
        connect, read, write, timeout = (int(g) for g in socket_errors.groups())
        errors["connect"] = connect
        errors["reset"] = read + write
        errors["timeout"] = timeout
    non_2xx = _WRK_NON_2XX.search(text)
    if non_2xx is not None:
        errors["status"] = int(non_2xx.group(1))
    return LoadResult("wrk", requests, measured_s, None, percentiles, errors)


def _wrk_once(spec: LoadSpec, duration_s: float) -> LoadResult:
    binary = wrk_path()
    if binary is None:
        raise LoadError("wrk is not installed")
    threads = max(min(spec.processes, spec.connections), 1)
    # wrk takes whole seconds; a fractional duration is rounded up so the window is never empty.
    argv = [
        binary,
        f"--threads={threads}",
        f"--connections={spec.connections}",
        f"--duration={max(math.ceil(duration_s), 1)}s",
        f"--timeout={max(math.ceil(spec.timeout_s), 1)}s",
        "--latency",
        f"http://{spec.host}:{spec.port}{spec.path}",
    ]
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + spec.timeout_s + 30, check=False
    )
    if completed.returncode != 0:
        raise LoadError(f"wrk exited {completed.returncode}: {completed.stderr.strip()}")
    return parse_wrk_output(completed.stdout)


def _run_wrk(
    spec: LoadSpec,
    on_measure_start: Callable[[], None] | None,
    on_measure_end: Callable[[], None] | None,
    on_ready: Callable[[], None] | None,
) -> LoadResult:
    if on_ready is not None:
        on_ready()
    warmup_errors = dict.fromkeys(ERROR_KINDS, 0)
    if spec.warmup_s > 0:
        warmup_errors = _wrk_once(spec, spec.warmup_s).errors
    if on_measure_start is not None:
        on_measure_start()
    result = _wrk_once(spec, spec.duration_s)
    if on_measure_end is not None:
        on_measure_end()
    for kind, count in warmup_errors.items():
        result.errors[kind] = result.errors.get(kind, 0) + count
    return result


# --- built-in generator -------------------------------------------------------------------


@final
class _Conn:
    __slots__ = ("close_after", "head", "in_flight", "remaining", "sock", "started", "status_ok")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = b""  # response head bytes while the blank line has not arrived yet
        self.remaining = -1  # body bytes still expected; -1 while the head is incomplete
        self.in_flight = False
        self.started = 0.0
        self.status_ok = True
        self.close_after = False  # the server said `Connection: close` (RFC 9112 section 9.6)


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def _parse_head(head: bytes) -> tuple[bool, int, bool] | None:
    """(status is 2xx, content-length, connection: close), or None when not framed by length."""
    status_ok = head[9:10] == b"2"  # "HTTP/1.1 2xx"
    lowered = head.lower()
    at = lowered.find(b"\r\ncontent-length:")
    if at < 0 or b"\r\ntransfer-encoding:" in lowered:
        return None
    start = at + len(b"\r\ncontent-length:")
    stop = lowered.find(b"\r\n", start)
    # A substring test is enough here: the servers under test send `connection: close` alone.
    close = b"\r\nconnection: close" in lowered
    try:
        return status_ok, int(lowered[start : stop if stop >= 0 else len(lowered)]), close
    except ValueError:
        return None


def _worker_main(spec: LoadSpec, connections: int, control: Connection) -> None:
    """Entry point of one load process: connect, report ready, wait for the start time, run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C and tears us down
    try:
        result = _worker_run(spec, connections, control)
    except BaseException as exc:
        control.send(("error", f"{type(exc).__name__}: {exc}"))
    else:
        control.send(("result", result))
    finally:
        control.close()


def _worker_run(spec: LoadSpec, connections: int, control: Connection) -> WorkerResult:
    request = (
        f"GET {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
        "User-Agent: resilient-ambassador-bench\r\nAccept: */*\r\n\r\n"
    ).encode()
    errors = dict.fromkeys(ERROR_KINDS, 0)
    latencies: array[float] = array("d")
    buffer = bytearray(RECV_BUFFER_BYTES)
    view = memoryview(buffer)
    selector = selectors.DefaultSelector()
    conns: list[_Conn] = []
    for _ in range(connections):
        conn = _Conn(_connect(spec.host, spec.port))
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        conns.append(conn)

    control.send(("ready", None))
    start_at: float = control.recv()
    measure_from = start_at + spec.warmup_s
    measure_until = measure_from + spec.duration_s
    completed = 0
    reconnects = 0
    monotonic = time.monotonic

    def send_request(conn: _Conn, now: float) -> bool:
        try:
            sent = conn.sock.send(request)
        except OSError:
            sent = -1
        if sent != len(request):  # an empty closed-loop socket always takes ~100 bytes at once
            errors["reset"] += 1
            return False
        conn.in_flight, conn.started, conn.head, conn.remaining = True, now, b"", -1
        return True

    def replace(conn: _Conn, kind: str, now: float) -> None:
        """Count a failure (when a request was in flight), reconnect and send again."""
        if conn.in_flight:
            errors[kind] += 1
        selector.unregister(conn.sock)
        conn.sock.close()
        conns.remove(conn)
        if now >= measure_until:
            return
        try:
            fresh = _Conn(_connect(spec.host, spec.port))
        except OSError:
            errors["connect"] += 1  # the connection is lost for the rest of the run
            return
        selector.register(fresh.sock, selectors.EVENT_READ, fresh)
        conns.append(fresh)
        if not send_request(fresh, monotonic()):
            replace(fresh, "reset", monotonic())

    while (now := monotonic()) < start_at:
        time.sleep(min(start_at - now, 0.01))
    for conn in list(conns):
        if not send_request(conn, monotonic()):
            replace(conn, "reset", monotonic())

    next_scan = monotonic() + TIMEOUT_SCAN_INTERVAL_S
    while conns:
        now = monotonic()
        if now >= measure_until:
            break
        if now >= next_scan:
            next_scan = now + TIMEOUT_SCAN_INTERVAL_S
            for conn in [c for c in conns if c.in_flight and now - c.started > spec.timeout_s]:
                replace(conn, "timeout", now)
        for key, _mask in selector.select(min(measure_until - now, TIMEOUT_SCAN_INTERVAL_S)):
            conn = key.data
            try:
                n = conn.sock.recv_into(buffer)
            except BlockingIOError:
                continue
            except OSError:
                replace(conn, "reset", monotonic())
                continue
            if n == 0:
                replace(conn, "eof", monotonic())
                continue
            if conn.remaining < 0:
                head = conn.head + view[:n] if conn.head else bytes(view[:n])
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    if len(head) > MAX_HEAD_BYTES:
                        replace(conn, "framing", monotonic())
                    else:
                        conn.head = head
                    continue
                parsed = _parse_head(head[:end])
                if parsed is None:
                    replace(conn, "framing", monotonic())
                    continue
                conn.status_ok, length, conn.close_after = parsed
                conn.head = b""
                conn.remaining = length - (len(head) - end - 4)
            else:
                conn.remaining -= n
            if conn.remaining > 0:
                continue
            if conn.remaining < 0:  # bytes beyond the framed body: we never pipeline
                replace(conn, "framing", monotonic())
                continue
            done = monotonic()
            conn.in_flight = False
            if not conn.status_ok:
                errors["status"] += 1
            if measure_from <= done < measure_until:
                completed += 1
                latencies.append(done - conn.started)
            if conn.close_after:  # not an error: the server closes after this response
                reconnects += 1
                replace(conn, "eof", done)
            elif done < measure_until and not send_request(conn, done):
                replace(conn, "reset", done)

    # Requests still in flight at the end are neither counted nor errors, unless overdue.
    end_time = monotonic()
    for conn in conns:
        if conn.in_flight and end_time - conn.started > spec.timeout_s:
            errors["timeout"] += 1
        conn.sock.close()
    selector.close()
    return completed, latencies, errors, reconnects


def _run_builtin(
    spec: LoadSpec,
    on_measure_start: Callable[[], None] | None,
    on_measure_end: Callable[[], None] | None,
    on_ready: Callable[[], None] | None,
) -> LoadResult:
    processes = max(min(spec.processes, spec.connections), 1)
    shares = [spec.connections // processes + (i < spec.connections % processes) for i in range(processes)]
    # spawn, not fork: the same on every platform, and safe whatever threads the parent has.
    context = multiprocessing.get_context("spawn")
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for share in shares:
            parent_end, child_end = context.Pipe()
            worker = context.Process(target=_worker_main, args=(spec, share, child_end), daemon=True)
            worker.start()
            child_end.close()
            workers.append((worker, parent_end))
        for _process, control in workers:
            _expect(control, "ready", 30.0)
        if on_ready is not None:
            on_ready()
        start_at = time.monotonic() + 0.05
        for _process, control in workers:
            control.send(start_at)
        _sleep_until(start_at + spec.warmup_s)
        if on_measure_start is not None:
            on_measure_start()
        _sleep_until(start_at + spec.warmup_s + spec.duration_s)
        if on_measure_end is not None:
            on_measure_end()
        requests = 0
        latencies: list[float] = []
        reconnects = 0
        errors = dict.fromkeys(ERROR_KINDS, 0)
        for _process, control in workers:
            count, samples, worker_errors, worker_reconnects = cast(
                WorkerResult, _expect(control, "result", spec.timeout_s + 30.0)
            )
            requests += count
            latencies.extend(samples)
            reconnects += worker_reconnects
            for kind, n in worker_errors.items():
                errors[kind] += n
        for process, _control in workers:
            process.join(5.0)
    finally:
        for process, control in workers:
            control.close()
            if process.is_alive():
                process.terminate()
                process.join(5.0)
    return LoadResult(
        "builtin", requests, spec.duration_s, latencies, summarise_latencies(latencies), errors, reconnects
    )


def _sleep_until(deadline: float) -> None:
    while (now := time.monotonic()) < deadline:
        time.sleep(min(deadline - now, 0.1))


def _expect(control: Connection, kind: str, timeout_s: float) -> object:
    if not control.poll(timeout_s):
        raise LoadError(f"load process sent no {kind!r} within {timeout_s:.0f} s")
    got_kind, payload = control.recv()
    if got_kind == "error":
        raise LoadError(f"load process failed: {payload}")
    if got_kind != kind:
        raise LoadError(f"load process sent {got_kind!r}, expected {kind!r}")
    return payload
