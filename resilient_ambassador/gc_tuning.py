"""The cyclic garbage collector, set for a long-running proxy process.

CPython's defaults suit programs that build object graphs: a young collection every 700 net
container allocations, and now and then a full one that walks every object alive, the
OpenTelemetry SDK, redis-py and every imported module included. A request here leaves no
cyclic garbage (reference counting frees all of it; a DEBUG_SAVEALL run over thousands of
requests found only start-up and shutdown objects), so every collection is pure cost. Measured
on the daemon at 1,000 req/s and under closed-loop load with the defaults (docs/benchmarks.md):
a young collection every ~70 requests, 0.3 ms each; a full one every few seconds, 30-40 ms, a
pause every request in flight waits out.

So, once start-up is done, what is alive then is frozen into the permanent generation (a full
collection no longer walks it: 0.7 ms), and young collections wait for 10,000 net allocations,
which steady traffic does not reach. Cyclic garbage, where some path makes it, is still
collected; only later. Processes that never call `settle` (the tests, an embedding app) keep
Python's defaults.
"""

from __future__ import annotations

import gc

from resilient_ambassador.core.redact import Json

# Young collections only after this many net container allocations (CPython's default: 700).
# A request allocates and frees a few hundred; thousands in flight at once still stay under it.
GEN0_THRESHOLD = 10_000


def settle() -> None:
    """After start-up: collect what start-up left, freeze the survivors, and raise the young
    threshold. Call once, from the process's entry point, not from a library."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def refreeze() -> None:
    """After a reload: the old config's objects were frozen, and a frozen object in a cycle is
    never collected. Thaw, collect once (a one-off pause, as long as a full collection), and
    freeze what is alive now. Does nothing in a process that never settled."""
    if gc.get_freeze_count() == 0:
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def stats() -> dict[str, Json]:
    """For the admin /stats: collections per generation since start, and how many objects
    are frozen (0: Python's defaults are in force)."""
    generations = gc.get_stats()
    return {
        "collections": [generation["collections"] for generation in generations],
        "collected": sum(generation["collected"] for generation in generations),
        "frozen": gc.get_freeze_count(),
        "thresholds": list(gc.get_threshold()),
    }
