"""Server subprocesses for benchmarks: free ports, readiness, CPU sampling, certain cleanup.

Every server runs in its own session, so a Ctrl-C in the terminal reaches only the harness,
which then stops each server itself (SIGTERM, a bounded wait, then SIGKILL) and can report
how each one exited. Each server's stderr goes to a temporary file (a pipe nobody reads
would fill up and stall the server under load).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import IO, final

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
# A port picked by bind(0) may be taken again before the server binds it: retry a few times.
PORT_ATTEMPTS = 3


class ServerFailed(RuntimeError):
    """A server did not start, or died while it was being waited for."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _clock_ticks_per_s() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


def _process_cpu_s(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _clock_ticks_per_s()


def _descendants(pid: int) -> list[int]:
    """Live descendants of `pid`, from the parent pids in /proc (Linux; [] elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


@final
class ServerProcess:
    """One server subprocess listening on 127.0.0.1:port."""

    def __init__(
        self, name: str, argv: Sequence[str], port: int, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.returncode: int | None = None
        # Owned by this object: closed in close(), which every caller reaches via try/finally.
        self._stderr: IO[bytes] = tempfile.TemporaryFile(prefix=f"bench-{name}-")  # noqa: SIM115
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
            env=None if env is None else dict(env),
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return once the port accepts a connection; raise if the process exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise ServerFailed(
                    f"{self.name} exited {self._proc.returncode} before accepting connections:\n"
                    + self.stderr_text()
                )
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise ServerFailed(f"{self.name} accepted no connection within {timeout_s:.0f} s")
            time.sleep(0.05)

    def cpu_s(self) -> float | None:
        """User + system CPU seconds used so far (Linux /proc only; None elsewhere)."""
        return _process_cpu_s(self._proc.pid)

    def tree_cpu_s(self) -> float | None:
        """CPU seconds of the process and its live descendants (a supervisor's workers)."""
        total = 0.0
        for pid in [self._proc.pid, *_descendants(self._proc.pid)]:
            used = _process_cpu_s(pid)
            if used is None and pid == self._proc.pid:
                return None
            total += used or 0.0
        return total

    def rss_kib(self) -> int | None:
        """Resident set size in KiB (Linux /proc only; None elsewhere)."""
        try:
            status = Path(f"/proc/{self._proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None

    def alive(self) -> bool:
        return self._proc.poll() is None

    def pin(self, cpus: Collection[int]) -> None:
        """Restrict every thread of the process to `cpus` (Linux). Threads started later inherit
        the mask of the thread that starts them, so pinning right after the start and again once
        the server is ready covers them all."""
        try:
            tids = sorted(int(tid) for tid in os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            tids = [self.pid]
        for tid in [self.pid, *(t for t in tids if t != self.pid)]:  # the main thread first
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cpus)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code (negative: killed by signal)."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self.returncode = self._proc.returncode
        return self.returncode

    def stderr_text(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def close(self) -> None:
        self.stop()
        self._stderr.close()


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def start_server(
    name: str,
    argv_for_port: Callable[[int], Sequence[str]],
    timeout_s: float = READY_TIMEOUT_S,
    cpus: Collection[int] | None = None,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Start a server on a free port and wait until it accepts connections; with `cpus`, the
    server runs on those CPUs only (Linux; see `can_pin`); `env` replaces the environment."""
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        server = ServerProcess(name, argv_for_port(port), port, env)
        try:
            if cpus is not None:
                server.pin(cpus)  # before the interpreter has started any thread of its own
            server.wait_ready(timeout_s)
            if cpus is not None:
                server.pin(cpus)  # and any thread it started in the meantime
        except ServerFailed as exc:
            stderr = server.stderr_text()
            server.close()
            if "Address already in use" in stderr and attempt + 1 < PORT_ATTEMPTS:
                continue
            raise exc
        except BaseException:
            server.close()
            raise
        return server
    raise AssertionError("unreachable")


def daemon_argv(upstream_url: str, *flags: str, admin: str = f"{LOOPBACK}:0") -> Callable[[int], list[str]]:
    """The daemon as every benchmark runs it: on 127.0.0.1:<port> in front of `upstream_url`,
    warnings only, with an admin listener of its own (ephemeral unless `admin` says where: the
    default 9901 may be another daemon's on this machine)."""
    return lambda port: [
        sys.executable,
        "-m",
        "resilient_ambassador",
        "run",
        "--listen",
        f"{LOOPBACK}:{port}",
        "--upstream",
        upstream_url,
        "--admin",
        admin,
        "--log-level",
        "warning",
        *flags,
    ]
