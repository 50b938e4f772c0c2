"""bench/ is a directory of scripts, not a package: its modules import each other by their
plain names (`from loadgen import ...`), so the tests put it on the path the same way."""

import sys
from pathlib import Path

BENCH_DIR = str(Path(__file__).resolve().parents[2] / "bench")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
