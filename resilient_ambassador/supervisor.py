"""`--workers N`: a parent that keeps N worker processes serving the same ports.

Each worker is the ordinary daemon (`run ... --worker-id I`) binding its listeners with
SO_REUSEPORT, so the kernel spreads connections across them and Python's one-core limit is
lifted. The parent serves nothing: it starts the workers, restarts one that dies (with a
growing backoff; it gives up on a crash loop, such as a port in use at start-up), forwards
SIGTERM and SIGINT to the workers as SIGTERM (a worker drains on the first and stops at once
on the second, as the single-process daemon does) and SIGHUP as is, and exits 0 after a clean
drain, 1 when the workers could not be kept running.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from typing import final

import trio

log = logging.getLogger("resilient_ambassador.supervisor")

# A worker that exits sooner than this after starting counts towards a crash loop.
FAST_EXIT_S = 2.0
CRASH_LOOP_LIMIT = 5
RESTART_BACKOFF_MIN_S = 0.1
RESTART_BACKOFF_MAX_S = 5.0


@final
class Supervisor:
    def __init__(
        self,
        worker_argv: Callable[[int], Sequence[str]],
        workers: int,
        *,
        fast_exit_s: float = FAST_EXIT_S,
        crash_loop_limit: int = CRASH_LOOP_LIMIT,
    ) -> None:
        self._worker_argv = worker_argv
        self.workers = workers
        self._fast_exit_s = fast_exit_s
        self._crash_loop_limit = crash_loop_limit
        self.processes: dict[int, trio.Process] = {}
        self.restarts = 0
        self.stopping = False
        self.failed = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Supervise until the workers are told to stop and have exited; the exit code."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward_signals, signals)
                async with trio.open_nursery() as workers:
                    for index in range(self.workers):
                        workers.start_soon(self._keep_running, index)
                    task_status.started()
                nursery.cancel_scope.cancel()
        return 1 if self.failed else 0

    def signal_workers(self, signum: int) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signum)

    def stop(self) -> None:
        """Drain every worker (SIGTERM); a second call tells them to stop at once."""
        self.stopping = True
        self.signal_workers(signal.SIGTERM)

    async def _forward_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: asking %d workers to reload", len(self.processes))
                self.signal_workers(signal.SIGHUP)
            else:
                log.info("%s: draining %d workers", signal.Signals(signum).name, len(self.processes))
                self.stop()

    async def _keep_running(self, index: int) -> None:
        fast_exits = 0
        while not self.stopping:
            argv = list(self._worker_argv(index))
            started = trio.current_time()
            process = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL)
            self.processes[index] = process
            log.info("worker %d started (pid %d)", index, process.pid)
            try:
                code = await process.wait()
            finally:
                if process.returncode is None:  # we are being cancelled: do not orphan it
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
            if self.stopping:
                if code != 0:
                    log.warning("worker %d (pid %d) exited with %s while stopping", index, process.pid, code)
                return
            lived_s = trio.current_time() - started
            fast_exits = fast_exits + 1 if lived_s < self._fast_exit_s else 0
            if fast_exits >= self._crash_loop_limit:
                log.error(
                    "worker %d exited %d times in a row within %gs of starting (last: %s): giving up",
                    index,
                    fast_exits,
                    self._fast_exit_s,
                    _describe(code),
                )
                self.failed = True
                self.stop()
                return
            delay_s = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_MIN_S * 2**fast_exits) if fast_exits else 0.0
            log.warning(
                "worker %d (pid %d) %s after %.1fs; restarting%s",
                index,
                process.pid,
                _describe(code),
                lived_s,
                f" in {delay_s:g}s" if delay_s else "",
            )
            self.restarts += 1
            await trio.sleep(delay_s)


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
