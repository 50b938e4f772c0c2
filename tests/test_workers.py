"""Real daemon processes: `--workers N` (SO_REUSEPORT under a supervisor) and SIGHUP reloads."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import trio

from resilient_ambassador.supervisor import Supervisor
from tests.support.client import http_request
from tests.support.process import CLI, run_command, wait_listening
from tests.support.process import free_port as _free_port
from tests.support.upstream import Reply, echo, start_fake_upstream


async def _worker_pids(admin_port: int, want: int) -> set[int]:
    """Worker pids seen through the shared admin port (each connection lands on one worker)."""
    seen: set[int] = set()
    with trio.fail_after(15):
        while len(seen) < want:
            try:
                stats = await http_request(admin_port, "GET", "/stats")
            except (OSError, trio.BrokenResourceError):
                # A killed worker's queued connections are reset (see docs/operations.md).
                await trio.sleep(0.02)
                continue
            if stats.status == 200:
                seen.add(json.loads(stats.body)["pid"])
    return seen


async def test_workers_share_the_port_and_a_killed_worker_is_replaced(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    port, admin_port = _free_port(), _free_port()
    with (tmp_path / "stderr.log").open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            run_command(port, admin_port, upstream.url(), "--workers", "2"),
            stderr=stderr,
        )
        try:
            await wait_listening(port, process)
            first = await _worker_pids(admin_port, 2)
            responses = [await http_request(port, "GET", f"/{i}") for i in range(20)]
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            with trio.fail_after(15):
                while True:
                    now = await _worker_pids(admin_port, 2)
                    if victim not in now:
                        break
            after_restart = await http_request(port, "GET", "/after")
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    assert all(r.status == 200 for r in responses)
    assert len(upstream.received) >= 20
    assert len(now) == 2
    assert now - first  # a new worker replaced the killed one
    assert after_restart.status == 200
    assert returncode == 0
    log = (tmp_path / "stderr.log").read_text()
    assert (
        f"worker 0 (pid {victim}) was killed by SIGKILL" in log
        or f"(pid {victim}) was killed by SIGKILL" in log
    )
    for pid in now:  # every worker drained and exited (and was reaped) with the supervisor
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_crash_loop_gives_up_with_exit_code_1() -> None:
    argv = [sys.executable, "-c", "import sys; sys.exit(3)"]
    supervisor = Supervisor(lambda _: argv, 2, fast_exit_s=5.0, crash_loop_limit=2)
    with trio.fail_after(20):
        code = await supervisor.run()
    assert code == 1
    assert supervisor.failed


async def test_sigterm_reaches_every_worker(nursery: trio.Nursery, tmp_path: Path) -> None:
    # Workers that exit 0 on SIGTERM and say when their handler is in place.
    script = (
        "import os, signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
        f"open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w').close(); time.sleep(60)"
    )
    supervisor = Supervisor(lambda _: [sys.executable, "-c", script], 3)
    done = trio.Event()
    codes: list[int] = []

    async def supervise() -> None:
        codes.append(await supervisor.run())
        done.set()

    nursery.start_soon(supervise)
    with trio.fail_after(10):
        while len(list(await trio.Path(tmp_path).iterdir())) < 3:  # noqa: ASYNC110 (polling processes)
            await trio.sleep(0.01)
    supervisor.stop()
    with trio.fail_after(10):
        await done.wait()
    assert codes == [0]
    assert all(p.returncode == 0 for p in supervisor.processes.values())


def test_workers_need_fixed_ports() -> None:
    from tests.test_cli import _run

    zero = _run("run", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9", "--workers", "2")
    none = _run("run", "--upstream", "http://127.0.0.1:9", "--workers", "0")
    assert (zero.returncode, none.returncode) == (2, 2)
    assert "workers need a fixed port" in zero.stderr
    assert "--workers: expected a whole number of at least 1" in none.stderr


async def _reload_counts(admin_port: int, want: dict[str, int]) -> None:
    with trio.fail_after(15):
        while json.loads((await http_request(admin_port, "GET", "/stats")).body)["reloads"] != want:  # noqa: ASYNC110
            await trio.sleep(0.02)


async def test_sighup_reloads_the_file_and_keeps_serving_through_broken_edits(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a = await start_fake_upstream(nursery, default=Reply(body=b"from-a"))
    b = await start_fake_upstream(nursery, default=Reply(body=b"from-b"))
    port, admin_port = _free_port(), _free_port()
    config = tmp_path / "ambassador.yaml"
    key = tmp_path / "key"
    key.write_text("k1")

    def write(upstream_url: str, extra: str = "") -> None:
        config.write_text(
            f"listeners: [{{name: main, listen: 127.0.0.1:{port}, routes: [{{upstream: api}}]}}]\n"
            f"upstreams: {{api: {{url: '{upstream_url}', headers: {{X-Key: '${{file:{key}}}'}}}}}}\n"
            f"admin: {{listen: 127.0.0.1:{admin_port}}}\n{extra}"
        )

    write(a.url())
    with (tmp_path / "stderr.log").open("wb") as stderr:
        process = await trio.lowlevel.open_process([*CLI, "run", "--config", str(config)], stderr=stderr)
        try:
            await wait_listening(port, process)
            first = await http_request(port, "GET", "/")
            config.write_text("listeners: [oops")  # a YAML syntax error
            process.send_signal(signal.SIGHUP)
            await _reload_counts(admin_port, {"succeeded": 0, "failed": 1})
            write(b.url(), "drain: {grace_period: -1s}\n")  # a schema error
            process.send_signal(signal.SIGHUP)
            await _reload_counts(admin_port, {"succeeded": 0, "failed": 2})
            key.unlink()
            write(b.url())  # the secret file is missing
            process.send_signal(signal.SIGHUP)
            await _reload_counts(admin_port, {"succeeded": 0, "failed": 3})
            still = await http_request(port, "GET", "/")
            key.write_text("k2")
            process.send_signal(signal.SIGHUP)
            await _reload_counts(admin_port, {"succeeded": 1, "failed": 3})
            after = await http_request(port, "GET", "/")
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    assert (first.body, still.body, after.body) == (b"from-a", b"from-a", b"from-b")
    assert returncode == 0
    log = (tmp_path / "stderr.log").read_text()
    assert "reload failed; the running config stays" in log
    assert "drain.grace_period" in log
    assert "config reloaded" in log
