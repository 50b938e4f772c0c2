"""Real daemon processes for tests: the command line, free ports, and waiting for a listener."""

from __future__ import annotations

import socket
import sys

import trio

CLI = [sys.executable, "-m", "resilient_ambassador"]


def run_command(port: int, admin_port: int, upstream: str, *flags: str) -> list[str]:
    """`resilient-ambassador run` on 127.0.0.1:`port`, its admin listener on `admin_port`,
    forwarding to `upstream`: the command line of the tests that start the daemon itself."""
    return [
        *CLI,
        "run",
        "--listen",
        f"127.0.0.1:{port}",
        "--admin",
        f"127.0.0.1:{admin_port}",
        "--upstream",
        upstream,
        *flags,
    ]


def free_port() -> int:
    """A loopback port nobody listens on right now (for processes that need a fixed port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_listening(port: int, process: trio.Process) -> None:
    """Until `port` accepts a connection; fails if `process` exits first or after 15 s."""
    with trio.fail_after(15):
        while True:
            assert process.returncode is None, "daemon exited early"
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return
