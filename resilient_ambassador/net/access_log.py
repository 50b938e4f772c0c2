"""The access log sink: formats records on the event loop, writes them in batches off it.

A write to stdout blocks when whoever reads the pipe (the kubelet, a log shipper) falls
behind; that must never stall traffic. Records collect in memory and a background task formats
them and writes the lines every `FLUSH_INTERVAL_S` (or sooner when `FLUSH_RECORDS` pile up) in
a worker thread. Formatting a batch in one loop costs less than half of formatting each record
on the request path (a cache hit paid 23 us for its line, now about 10: docs/benchmarks.md),
and the request no longer waits for it. A batch is formatted in slices with a yield between
them, so requests arriving meanwhile are served instead of waiting for the whole batch.
If the output stays stuck until `MAX_PENDING_RECORDS` are waiting, new records are dropped and
counted rather than buffered without bound: losing log lines beats losing requests.
Known secret values are scrubbed from each batch just before it is written.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import final

import trio

from resilient_ambassador.core.access_log import AccessRecord, scrub, to_json, to_text
from resilient_ambassador.core.config import AccessLogConfig
from resilient_ambassador.core.log_throttle import LogThrottle

log = logging.getLogger("resilient_ambassador.access_log")

FLUSH_INTERVAL_S = 0.2
FLUSH_RECORDS = 256  # about 100 KiB of JSON lines
# Records formatted between two yields to the other tasks: about 0.15 ms of work, where a whole
# batch held the loop for 1-2 ms, a stall every request arriving meanwhile waited out.
FORMAT_SLICE = 32
MAX_PENDING_RECORDS = 16_384  # about 6 MiB of lines, a few seconds of a busy daemon
STDOUT = "-"


@final
class AccessLog:
    def __init__(
        self,
        config: AccessLogConfig,
        secret_values: Callable[[], Collection[str]] = frozenset,
        fd: int | None = None,
    ) -> None:
        self._format = to_json if config.format == "json" else to_text
        self._secret_values = secret_values
        self._path = config.path
        self._fd = fd
        self._owns_fd = False
        self._pending: list[AccessRecord] = []
        self._unwritten: deque[bytes] = deque()  # formatted batches, oldest first
        # An idle daemon has no timer running here: the loop sleeps until a line arrives.
        self._has_lines = trio.Event()
        self._full = trio.Event()
        self._throttle = LogThrottle()
        self._write_lock = threading.Lock()
        self.lines = 0
        self.dropped = 0
        self.write_errors = 0

    def record(self, record: AccessRecord) -> None:
        pending = self._pending
        if len(pending) >= MAX_PENDING_RECORDS:
            self.dropped += 1
            return
        if not pending:
            self._has_lines.set()
        pending.append(record)
        self.lines += 1
        if len(pending) == FLUSH_RECORDS:
            self._full.set()

    def open(self) -> None:
        """Open the output (a file path is opened for appending, like nginx's access_log)."""
        if self._fd is not None:
            return
        if self._path == STDOUT:
            self._fd = 1
        else:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._owns_fd = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush batches until cancelled; a last flush happens in `aclose`."""
        self.open()
        task_status.started()
        while True:
            await self._has_lines.wait()
            with trio.move_on_after(FLUSH_INTERVAL_S):
                await self._full.wait()
            self._has_lines, self._full = trio.Event(), trio.Event()
            await self.flush()

    async def flush(self) -> None:
        if self._pending:
            self._unwritten.append(await self._format_batch())
        if self._unwritten:
            # Abandoned on cancel: a stuck stdout must not hold up a drain. A batch whose write
            # never started stays in `_unwritten` for the next flush (aclose's last one).
            await trio.to_thread.run_sync(self._write_unwritten, abandon_on_cancel=True)

    async def _format_batch(self) -> bytes:
        records, self._pending = self._pending, []
        lines: list[str] = []
        for start in range(0, len(records), FORMAT_SLICE):
            if start:
                # Not a cancellation point: the records taken above must reach the output.
                await trio.lowlevel.cancel_shielded_checkpoint()
            lines.extend(map(self._format, records[start : start + FORMAT_SLICE]))
        lines.append("")  # the batch ends with a newline
        batch = scrub("\n".join(lines), self._secret_values())
        return batch.encode("utf-8", "backslashreplace")

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await self.flush()
        if self._owns_fd and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_unwritten(self) -> None:
        """In a worker thread: write the batches waiting, in order. The lock keeps a later
        flush from interleaving with an abandoned one that wakes up."""
        fd = self._fd
        if fd is None:
            return
        with self._write_lock:
            while self._unwritten:
                data = self._unwritten.popleft()
                try:
                    for chunk in _atomic_chunks(data):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                except OSError as exc:
                    self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        self.write_errors += 1
        # Only called under the write lock, so the throttle is never touched concurrently.
        if self._throttle.allow(("write",), time.monotonic()) is not None:
            log.warning("access log: cannot write (%s); lines lost", exc.strerror or exc)


def _atomic_chunks(data: bytes, limit: int = select.PIPE_BUF) -> list[bytes]:
    """`data` cut at line ends into writes of at most `limit` bytes where lines allow: a pipe
    write up to PIPE_BUF is atomic, so lines from several `--workers` sharing stdout never
    interleave mid-line."""
    if len(data) <= limit:
        return [data]
    chunks: list[bytes] = []
    start = 0
    while start < len(data):
        end = start + limit
        if end < len(data):
            cut = data.rfind(b"\n", start, end)
            # A single line longer than the limit goes alone (it cannot be atomic anyway).
            end = cut + 1 if cut >= start else data.find(b"\n", end) + 1 or len(data)
        chunks.append(data[start:end])
        start = end
    return chunks
