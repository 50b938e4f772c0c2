"""Reads and writes on a plain TCP socket's file descriptor, for the request hot path.

trio's SocketStream makes every call a full trip through the scheduler, reads and writes alike,
behind several layers of wrappers. Here a write the kernel takes whole (nearly all of them on
loopback) is one syscall and nothing else, and a read yields to the scheduler once, then reads.
That one yield is what makes reads cheap under load: while the other connections' tasks run,
the peer's answer arrives, so the read finds it and no epoll registration is needed (strace on
the pass-through benchmark: about two reads and two writes per request, like a bare trio
forwarder, and almost no epoll_ctl). Only when nothing is there does it wait for readability.
Every read is a checkpoint, so no task starves the others and cancellation is honoured.
Only for sockets without TLS: TLS goes through trio's SSLStream.

Errors are the OS's (OSError, EOF as b""); callers map them, as they do for the streams.
"""

from __future__ import annotations

import os

import trio


async def receive(fd: int, max_bytes: int) -> bytes:
    """What `fd` has to read (b"" at EOF), waiting for it if need be."""
    data = await receive_ready(fd, max_bytes)
    return data if data is not None else await receive_wait(fd, max_bytes)


async def receive_ready(fd: int, max_bytes: int) -> bytes | None:
    """Yield to the scheduler once, then what is there to read (b"" at EOF), or None. Callers
    that wait under a deadline set it up only when this found nothing: under load it rarely
    does, and a cancel scope costs more than the read."""
    await trio.lowlevel.checkpoint()
    try:
        return os.read(fd, max_bytes)
    except BlockingIOError:
        return None


async def receive_wait(fd: int, max_bytes: int) -> bytes:
    """Wait for readability, then read (b"" at EOF): after `receive_ready` found nothing."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            continue  # a spurious wake-up


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
