"""A throwaway redis-server per test, on a free port, stopped by PID: tests that kill, pause or
freeze Redis never touch the shared one on 6379."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence

import pytest

from tests.support.process import free_port

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT_S = 5.0


class RedisServer:
    """One redis-server process; `start()` again after `kill()` reuses the port."""

    def __init__(
        self, port: int | None = None, *, args: Sequence[str] = (), cwd: str | os.PathLike[str] | None = None
    ) -> None:
        """`args`: extra redis-server options (cluster mode, TLS, replicaof, --sentinel with a
        config file first); `cwd`: where it writes its files (a cluster's nodes.conf)."""
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed (scripts/test installs it with apt-get)")
        self.port = port or free_port()
        self.args = tuple(args)
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None
        assert REDIS_SERVER is not None
        config_file = list(self.args[:1]) if self.args[:1] and not self.args[0].startswith("--") else []
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                *config_file,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                *self.args[len(config_file) :],
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.cwd,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if self.stopped:
            process.send_signal(signal.SIGCONT)
            self.stopped = False
        process.kill()
        process.wait(timeout=5)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (a hung or swapped-out Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.stopped = True

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.stopped = False

    def command(self, *args: str) -> bytes:
        """One raw command over a fresh socket (no client library, no pool to clean up)."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
            sock.sendall(payload)
            return sock.recv(65536)

    def _answers(self) -> bool:
        try:
            return self.command("PING").startswith(b"+PONG")
        except OSError:
            return False


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()
