"""Reads and writes on a plain TCP socket's file descriptor, for the request hot path.

trio's SocketStream makes every call a full checkpoint (a trip through the scheduler even when
the kernel had the bytes at once) and always tries the syscall before waiting. A proxy knows
better: a keep-alive client's next request, or an upstream's answer to a request just sent, is
almost never there yet, so `receive` waits for readability first and then reads once, saving
the EAGAIN round; and a write that the kernel takes whole (nearly all of them on loopback) costs
one syscall and no scheduling. Every request still waits at least once in the scheduler, so
other tasks are never starved. Only for sockets without TLS: TLS goes through trio's SSLStream.

Errors are the OS's (OSError, EOF as b""); callers map them, as they do for the streams.
"""

from __future__ import annotations

import os

import trio


async def receive(fd: int, max_bytes: int) -> bytes:
    """Wait until `fd` is readable, then read what is there (b"" at EOF)."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            continue  # woken without data (another reader took it, or a spurious wake-up)


def receive_nowait(fd: int, max_bytes: int) -> bytes | None:
    """What is already there (b"" at EOF), or None without blocking."""
    try:
        return os.read(fd, max_bytes)
    except BlockingIOError:
        return None


def send_nowait(fd: int, data: bytes) -> int:
    """Write what the kernel takes now; how many bytes that was (0 when its buffer is full)."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


async def send_all(fd: int, data: bytes, sent: int = 0) -> None:
    """Write `data` from offset `sent` on, waiting for room when the kernel's buffer is full."""
    view = memoryview(data)
    while sent < len(data):
        await trio.lowlevel.wait_writable(fd)
        try:
            sent += os.write(fd, view[sent:])
        except BlockingIOError:
            continue
