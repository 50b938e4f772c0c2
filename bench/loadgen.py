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

import dataclasses
import itertools
import math
import multiprocessing
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, cast, final

RECV_BUFFER_BYTES = 256 * 1024
# Same order as h11's default: a response head bigger than this is a bug, not a benchmark.
MAX_HEAD_BYTES = 64 * 1024
# How often the built-in generator looks for requests older than the per-request timeout.
TIMEOUT_SCAN_INTERVAL_S = 0.1
CONNECT_TIMEOUT_S = 5.0

# Reported by every generator (wrk: the ones its --latency output has).
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile_key(pct: float) -> str:
    """ "p50", "p99", "p99.9": the key a percentile has in `percentiles_ms`."""
    return f"p{pct:g}"


ERROR_KINDS = ("connect", "eof", "reset", "timeout", "status", "framing")

GeneratorName = Literal["builtin", "wrk"]


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
    # Every request a path of its own (`<path>/<nonce>-<process>-<n>`): a cache in front of the
    # upstream then really misses, each request on its own key, instead of coalescing
    # concurrent requests for one key behind a single upstream fetch (docs/cache.md).
    unique_paths: bool = False
    # The status code (or its prefix) a response must have to count as a success: "2" for any
    # 2xx; "503" when the scenario is an open breaker answering for a dead upstream.
    expect_status: str = "2"
    # 0: closed loop (each connection sends its next request when the previous one completed).
    # Above 0: open loop at this constant rate in total, latency from each request's intended
    # send time (see run_open_loop).
    rate_per_s: float = 0.0


@dataclass
class LoadResult:
    generator: GeneratorName
    requests: int  # completed inside the measured window
    measured_s: float
    latencies_s: list[float] | None  # exact samples (built-in); None when only percentiles are known
    percentiles_ms: dict[str, float]  # keys "p50", "p90", "p99" (and "max" when known)
    errors: dict[str, int] = field(default_factory=dict)
    reconnects: int | None = None  # after `Connection: close`; wrk does them but does not count them
    mode: Literal["closed", "open"] = "closed"
    rate_per_s: float = 0.0  # open loop: the intended rate
    scheduled: int = 0  # open loop: requests due in the measured window
    unsent: int = 0  # open loop: of those, never sent (the target could not keep up)
    histogram: Literal["exact", "hdr"] = "exact"  # how the percentiles were computed

    @property
    def saturated(self) -> bool:
        """An open loop the target could not keep up with: more than 1% of the requests due
        were never sent, or fewer than 95% completed. Its percentiles are lower bounds. (A
        stall just before the window closes leaves a few unsent in a healthy run.)"""
        return self.mode == "open" and (
            self.unsent > 0.01 * self.scheduled or self.requests < 0.95 * self.scheduled
        )

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
    # The epsilon keeps float error from bumping an exact rank up (99.9% of 1000 is 999).
    rank = max(math.ceil(pct / 100.0 * len(sorted_values) - 1e-9), 1)
    return sorted_values[rank - 1]


def summarise_latencies(latencies_s: Sequence[float]) -> dict[str, float]:
    """Exact nearest-rank percentiles (ms) of latencies in seconds, keyed as `percentile_key`."""
    ordered = sorted(latencies_s)
    result = {percentile_key(p): percentile(ordered, p) * 1000.0 for p in PERCENTILES}
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
    if generator == "wrk" and spec.rate_per_s <= 0:  # wrk (unlike wrk2) has no constant rate
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


# Unique paths under wrk: each thread numbers its requests (`<path>/<nonce>-<thread>-<n>`).
WRK_UNIQUE_PATHS_LUA = """
local threads = 0
function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end
function init(args)
  prefix = args[1] .. "/" .. args[2] .. "-" .. thread_id .. "-"
  counter = 0
end
function request()
  counter = counter + 1
  return wrk.format("GET", prefix .. counter)
end
"""


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
    ]
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as scratch:
        if spec.unique_paths:
            script = Path(scratch) / "unique_paths.lua"
            script.write_text(WRK_UNIQUE_PATHS_LUA)
            argv += ["--script", str(script)]
        argv.append(f"http://{spec.host}:{spec.port}{spec.path}")
        if spec.unique_paths:
            argv += ["--", spec.path.rstrip("/"), f"{os.getpid():x}{time.monotonic_ns() % 1_000_000:x}"]
        completed = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + spec.timeout_s + 30, check=False
        )
    if completed.returncode != 0:
        raise LoadError(f"wrk exited {completed.returncode}: {completed.stderr.strip()}")
    result = parse_wrk_output(completed.stdout)
    if spec.expect_status != "2":
        # wrk counts every response outside 2xx/3xx; when those are what the scenario expects
        # (an open breaker's 503s), the responses that were NOT among them are the errors.
        result.errors["status"] = max(result.requests - result.errors["status"], 0)
    return result


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


# --- latency recording ----------------------------------------------------------------------

# HdrHistogram range and precision, as wrk2 uses: 1 us to 60 s, 3 significant digits (0.1%).
HDR_LOWEST_US = 1
HDR_HIGHEST_US = 60_000_000
HDR_SIGNIFICANT_DIGITS = 3


def hdr_available() -> bool:
    try:
        import hdrh.histogram  # noqa: F401
    except ImportError:
        return False
    return True


def new_histogram() -> Any:
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, HDR_SIGNIFICANT_DIGITS)


def summarise_histogram(encoded_parts: Sequence[bytes]) -> tuple[int, dict[str, float]]:
    """Merge the load processes' encoded HdrHistograms (microseconds): (count, percentiles in ms)."""
    merged = new_histogram()
    for part in encoded_parts:
        merged.decode_and_add(part)
    count = int(merged.get_total_count())
    if not count:
        return 0, {**{percentile_key(p): math.nan for p in PERCENTILES}, "max": math.nan}
    result = {percentile_key(p): merged.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES}
    result["max"] = merged.get_max_value() / 1000.0
    return count, result


@final
class OpenLoopSchedule:
    """When each request of an open-loop load is due: request k at start + k / rate.

    Each request is timed from this intended send time, not from when a connection was free
    to send it (the wrk2 approach). A closed loop, or an open loop timing from the actual
    send, waits for a stalled server before sending more, and so leaves out exactly the
    requests that would have waited longest: coordinated omission. Here a stall of S seconds
    shows up as S * rate requests with latencies spread from S down to 0, as users at that
    rate would have seen them."""

    def __init__(self, start_s: float, rate_per_s: float) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self.start_s = start_s
        self.interval_s = 1.0 / rate_per_s
        self.issued = 0  # requests handed out so far (0..issued-1)

    def intended_s(self, index: int) -> float:
        return self.start_s + index * self.interval_s

    def next_due_s(self) -> float:
        return self.intended_s(self.issued)

    def take_due(self, now_s: float) -> float | None:
        """The intended send time of the next request if it is due by `now_s` (and count it as
        issued), else None."""
        due = self.next_due_s()
        if due > now_s:
            return None
        self.issued += 1
        return due

    def count_between(self, from_s: float, until_s: float) -> int:
        """How many requests are due in [from_s, until_s)."""
        return max(self.first_index_at_or_after(until_s) - self.first_index_at_or_after(from_s), 0)

    def first_index_at_or_after(self, at_s: float) -> int:
        # A small epsilon keeps k / rate on the boundary itself from rounding either way.
        return max(math.ceil((at_s - self.start_s) / self.interval_s - 1e-9), 0)


def corrected_latencies_s(intended_s: Sequence[float], completed_s: Sequence[float]) -> list[float]:
    """Latency of each request measured from its intended send time (coordinated omission
    corrected): what `OpenLoopSchedule` users record."""
    return [done - due for due, done in zip(intended_s, completed_s, strict=True)]


# --- built-in generator -------------------------------------------------------------------


@dataclass
class WorkerResult:
    """What one load process sends back."""

    completed: int  # measured requests that completed
    latencies_s: array[float] | None  # closed loop: every sample
    histogram: bytes | None  # open loop: an encoded HdrHistogram of microseconds
    open_samples_s: array[float] | None  # open loop without hdrhistogram installed
    errors: dict[str, int]
    reconnects: int
    scheduled: int = 0  # open loop: requests due inside the measured window
    unsent: int = 0  # open loop: due in the window, never sent (no free connection in time)


@final
class _Conn:
    __slots__ = ("close_after", "head", "in_flight", "measured", "remaining", "sock", "started", "status_ok")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = b""  # response head bytes while the blank line has not arrived yet
        self.remaining = -1  # body bytes still expected; -1 while the head is incomplete
        self.in_flight = False
        self.started = 0.0  # closed loop: when sent; open loop: when it was due
        self.measured = False  # open loop: due inside the measured window
        self.status_ok = True
        self.close_after = False  # the server said `Connection: close` (RFC 9112 section 9.6)


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def _parse_head(head: bytes, expect_status: bytes = b"2") -> tuple[bool, int, bool] | None:
    """(status as expected, content-length, connection: close), or None when not framed by length."""
    status_ok = head[9 : 9 + len(expect_status)] == expect_status  # "HTTP/1.1 2xx"
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


def _request_factory(spec: LoadSpec, worker_index: int) -> Callable[[], bytes]:
    """What each request of one load process looks like: one fixed GET, or with
    `unique_paths` a fresh path every time."""
    tail = (
        f" HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
        "User-Agent: resilient-ambassador-bench\r\nAccept: */*\r\n\r\n"
    ).encode()
    if not spec.unique_paths:
        fixed = f"GET {spec.path}".encode() + tail
        return lambda: fixed
    prefix = f"GET {spec.path.rstrip('/')}/{os.getpid():x}-{worker_index}-".encode()
    counter = itertools.count()
    return lambda: prefix + str(next(counter)).encode() + tail


def _worker_main(spec: LoadSpec, connections: int, worker_index: int, control: Connection) -> None:
    """Entry point of one load process: connect, report ready, wait for the start time, run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C and tears us down
    try:
        result = _worker_run(spec, connections, worker_index, control)
    except BaseException as exc:
        control.send(("error", f"{type(exc).__name__}: {exc}"))
    else:
        control.send(("result", result))
    finally:
        control.close()


def _worker_run(spec: LoadSpec, connections: int, worker_index: int, control: Connection) -> WorkerResult:
    """One load process: an epoll loop over plain non-blocking sockets.

    Closed loop: every connection sends its next request as soon as the previous response has
    arrived; latency is from the send. Open loop (`spec.rate_per_s`, this process's share):
    requests are due on an `OpenLoopSchedule` and go out on an idle connection as soon as
    they are due (or as soon as one is free, when none is); latency is from the time the
    request was due. Requests due in the measured window that are still in flight at its end
    are waited for (up to the timeout); those never sent count as `unsent`."""
    next_request = _request_factory(spec, worker_index)
    expect = spec.expect_status.encode()
    open_loop = spec.rate_per_s > 0
    errors = dict.fromkeys(ERROR_KINDS, 0)
    latencies: array[float] = array("d")
    open_samples: array[float] = array("d")
    histogram = new_histogram() if open_loop and hdr_available() else None
    buffer = bytearray(RECV_BUFFER_BYTES)
    view = memoryview(buffer)
    selector = selectors.DefaultSelector()
    conns: list[_Conn] = []
    idle: list[_Conn] = []  # open loop: connections with nothing in flight
    for _ in range(connections):
        conn = _Conn(_connect(spec.host, spec.port))
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        conns.append(conn)
        idle.append(conn)

    control.send(("ready", None))
    start_at: float = control.recv()
    measure_from = start_at + spec.warmup_s
    measure_until = measure_from + spec.duration_s
    schedule = OpenLoopSchedule(start_at, spec.rate_per_s) if open_loop else None
    completed = 0
    reconnects = 0
    measured_in_flight = 0
    monotonic = time.monotonic

    def send_request(conn: _Conn, started: float) -> bool:
        nonlocal measured_in_flight
        request = next_request()
        try:
            sent = conn.sock.send(request)
        except OSError:
            sent = -1
        if sent != len(request):  # an idle socket always takes a small request at once
            errors["reset"] += 1
            return False
        conn.in_flight, conn.started, conn.head, conn.remaining = True, started, b"", -1
        conn.measured = open_loop and measure_from <= started < measure_until
        measured_in_flight += conn.measured
        return True

    def record(latency_s: float) -> None:
        if not open_loop:
            latencies.append(latency_s)
        elif histogram is not None:
            histogram.record_value(max(round(latency_s * 1e6), HDR_LOWEST_US))
        else:
            open_samples.append(latency_s)

    def replace(conn: _Conn, kind: str, now: float) -> None:
        """Count a failure (when a request was in flight) and reconnect: a closed loop sends
        again at once, an open loop puts the fresh connection among the idle ones."""
        nonlocal measured_in_flight
        if conn.in_flight:
            errors[kind] += 1
            measured_in_flight -= conn.measured
            conn.in_flight = False
        selector.unregister(conn.sock)
        conn.sock.close()
        conns.remove(conn)
        if conn in idle:
            idle.remove(conn)
        if now >= measure_until:
            return
        try:
            fresh = _Conn(_connect(spec.host, spec.port))
        except OSError:
            errors["connect"] += 1  # the connection is lost for the rest of the run
            return
        selector.register(fresh.sock, selectors.EVENT_READ, fresh)
        conns.append(fresh)
        if open_loop:
            idle.append(fresh)
        elif not send_request(fresh, monotonic()):
            replace(fresh, "reset", monotonic())

    while (now := monotonic()) < start_at:
        time.sleep(min(start_at - now, 0.01))
    if not open_loop:
        idle.clear()
        for conn in list(conns):
            if not send_request(conn, monotonic()):
                replace(conn, "reset", monotonic())

    # The drain after the window: in-flight measured requests may finish, up to the timeout.
    stop_at = measure_until + (spec.timeout_s if open_loop else 0.0)
    next_scan = monotonic() + TIMEOUT_SCAN_INTERVAL_S
    while conns:
        now = monotonic()
        if now >= stop_at or (open_loop and now >= measure_until and not measured_in_flight):
            break
        if now >= next_scan:
            next_scan = now + TIMEOUT_SCAN_INTERVAL_S
            for conn in [c for c in conns if c.in_flight and now - c.started > spec.timeout_s]:
                replace(conn, "timeout", now)
        wait_s = min(max(stop_at - now, 0.0), TIMEOUT_SCAN_INTERVAL_S)
        if schedule is not None and now < measure_until:
            while idle and (due := schedule.take_due(now)) is not None:
                conn = idle.pop()
                if not send_request(conn, due):
                    replace(conn, "reset", now)
            if idle:
                wait_s = min(wait_s, max(schedule.next_due_s() - now, 0.0))
        for key, _mask in selector.select(wait_s):
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
                parsed = _parse_head(head[:end], expect)
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
            if open_loop:
                if conn.measured:
                    measured_in_flight -= 1
                    completed += 1
                    record(done - conn.started)
            elif measure_from <= done < measure_until:
                completed += 1
                record(done - conn.started)
            if conn.close_after:  # not an error: the server closes after this response
                reconnects += 1
                replace(conn, "eof", done)
            elif open_loop:
                idle.append(conn)
            elif done < measure_until and not send_request(conn, done):
                replace(conn, "reset", done)

    # Closed loop: requests still in flight at the end are neither counted nor errors, unless
    # overdue. Open loop: the drain has waited for them; what is left timed out.
    end_time = monotonic()
    for conn in conns:
        if conn.in_flight and ((open_loop and conn.measured) or end_time - conn.started > spec.timeout_s):
            errors["timeout"] += 1
        conn.sock.close()
    selector.close()
    scheduled = unsent = 0
    if schedule is not None:
        scheduled = schedule.count_between(measure_from, measure_until)
        first_unsent = max(schedule.issued, schedule.first_index_at_or_after(measure_from))
        last = schedule.first_index_at_or_after(measure_until)  # one past the window's last
        unsent = max(last - first_unsent, 0)
        # Never sent, but due: each waited at least until the window closed. Recording that
        # lower bound keeps a saturated run's tail honest instead of leaving them out.
        for index in range(first_unsent, last):
            record(max(measure_until - schedule.intended_s(index), 0.0))
    return WorkerResult(
        completed=completed,
        latencies_s=None if open_loop else latencies,
        histogram=histogram.encode() if histogram is not None else None,
        open_samples_s=open_samples if open_loop and histogram is None else None,
        errors=errors,
        reconnects=reconnects,
        scheduled=scheduled,
        unsent=unsent,
    )


def _run_builtin(
    spec: LoadSpec,
    on_measure_start: Callable[[], None] | None,
    on_measure_end: Callable[[], None] | None,
    on_ready: Callable[[], None] | None,
) -> LoadResult:
    processes = max(min(spec.processes, spec.connections), 1)
    shares = [spec.connections // processes + (i < spec.connections % processes) for i in range(processes)]
    open_loop = spec.rate_per_s > 0
    # spawn, not fork: the same on every platform, and safe whatever threads the parent has.
    context = multiprocessing.get_context("spawn")
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for index, share in enumerate(shares):
            parent_end, child_end = context.Pipe()
            # Each process gets its share of the rate, in proportion to its connections.
            worker_spec = (
                dataclasses.replace(spec, rate_per_s=spec.rate_per_s * share / spec.connections)
                if open_loop
                else spec
            )
            worker = context.Process(
                target=_worker_main, args=(worker_spec, share, index, child_end), daemon=True
            )
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
        parts = [
            cast(WorkerResult, _expect(control, "result", spec.timeout_s * 2 + 30.0))
            for _process, control in workers
        ]
        for process, _control in workers:
            process.join(5.0)
    finally:
        for process, control in workers:
            control.close()
            if process.is_alive():
                process.terminate()
                process.join(5.0)
    errors = dict.fromkeys(ERROR_KINDS, 0)
    for part in parts:
        for kind, n in part.errors.items():
            errors[kind] += n
    requests = sum(p.completed for p in parts)
    reconnects = sum(p.reconnects for p in parts)
    if not open_loop:
        latencies = [x for p in parts if p.latencies_s is not None for x in p.latencies_s]
        return LoadResult(
            "builtin",
            requests,
            spec.duration_s,
            latencies,
            summarise_latencies(latencies),
            errors,
            reconnects,
        )
    encoded = [p.histogram for p in parts if p.histogram is not None]
    if encoded:
        _count, percentiles = summarise_histogram(encoded)
        samples = None
    else:
        samples = [x for p in parts if p.open_samples_s is not None for x in p.open_samples_s]
        percentiles = summarise_latencies(samples)
    return LoadResult(
        "builtin",
        requests,
        spec.duration_s,
        samples,
        percentiles,
        errors,
        reconnects,
        mode="open",
        rate_per_s=spec.rate_per_s,
        scheduled=sum(p.scheduled for p in parts),
        unsent=sum(p.unsent for p in parts),
        histogram="hdr" if encoded else "exact",
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
