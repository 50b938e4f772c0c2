"""The daemon process settles the garbage collector once started (gc_tuning). Each check runs
in a child interpreter: freezing is process-wide, and the test process must keep its own."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import trio

from resilient_ambassador.gc_tuning import GEN0_THRESHOLD
from tests.support.client import http_request
from tests.support.process import CLI, free_port, wait_listening
from tests.support.upstream import echo, start_fake_upstream


def _in_child(code: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; it prints one JSON object, returned here."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=30, check=True
    )
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_settle_freezes_what_is_alive_and_raises_the_young_threshold() -> None:
    seen = _in_child(
        """
        import gc, json
        from resilient_ambassador import gc_tuning
        before = gc.get_threshold()
        gc_tuning.settle()
        print(json.dumps({"before": before, "stats": gc_tuning.stats()}))
        """
    )
    stats = seen["stats"]
    assert seen["before"] == [700, 10, 10]  # CPython's defaults, kept for gen1 and gen2
    assert stats["thresholds"] == [GEN0_THRESHOLD, 10, 10]
    assert stats["frozen"] > 10_000  # the interpreter and every imported module


def test_refreeze_collects_a_cycle_that_died_frozen_and_does_nothing_unsettled() -> None:
    seen = _in_child(
        """
        import gc, json, weakref
        from resilient_ambassador import gc_tuning

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.peer, b.peer = b, a
            return a

        gc_tuning.refreeze()  # never settled: a no-op
        unsettled = gc_tuning.stats()
        old = cycle()  # say, the pipeline a reload replaces
        gone = weakref.ref(old)
        gc_tuning.settle()
        del old
        gc.collect()
        survived_collect = gone() is not None  # frozen: a full collection does not see it
        gc_tuning.refreeze()
        print(json.dumps({
            "unsettled": unsettled,
            "survived_collect": survived_collect,
            "collected_by_refreeze": gone() is None,
            "frozen_after": gc.get_freeze_count(),
        }))
        """
    )
    unsettled = seen["unsettled"]
    assert unsettled["frozen"] == 0
    assert unsettled["thresholds"] == [700, 10, 10]
    assert seen["survived_collect"] is True
    assert seen["collected_by_refreeze"] is True
    assert seen["frozen_after"] > 10_000


async def test_the_daemon_settles_once_serving_and_reports_it(nursery: trio.Nursery, tmp_path: Path) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    port, admin_port = free_port(), free_port()
    config = tmp_path / "ambassador.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            listeners:
              - name: main
                listen: 127.0.0.1:{port}
                routes:
                  - {{name: all, match: {{prefix: /}}, upstream: up}}
            upstreams:
              up: {{url: "{upstream.url()}"}}
            admin:
              listen: 127.0.0.1:{admin_port}
            """
        )
    )
    command = [*CLI, "run", "--config", str(config)]
    process = await trio.lowlevel.open_process(command, stderr=subprocess.DEVNULL)
    try:
        await wait_listening(port, process)
        assert (await http_request(port, "GET", "/one")).status == 200
        settled = json.loads((await http_request(admin_port, "GET", "/stats")).body)["gc"]
        process.send_signal(signal.SIGHUP)  # a reload re-freezes what the new config left alive
        with trio.fail_after(10):
            while True:
                reloaded = json.loads((await http_request(admin_port, "GET", "/stats")).body)
                if reloaded["reloads"]["succeeded"]:
                    break
                await trio.sleep(0.05)
        assert (await http_request(port, "GET", "/two")).status == 200
    finally:
        process.kill()
        await process.wait()
    assert settled["thresholds"][0] == GEN0_THRESHOLD
    assert settled["frozen"] > 10_000
    assert reloaded["gc"]["frozen"] > 10_000
    assert reloaded["gc"]["thresholds"][0] == GEN0_THRESHOLD
