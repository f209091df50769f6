"""How big a benchmark runs: the figures `make bench` prints, or one tiny pass for the smoke test.

`BENCH_SMOKE=1` (set by tests/test_bench_smoke.py) makes every bench script run each of its steps
once at the smallest size, so a refactor that breaks a script fails a test instead of `make bench`.
The figures of a smoke pass mean nothing; the scripts say so in their first line.
"""

from __future__ import annotations

import os

SMOKE = os.environ.get("BENCH_SMOKE") == "1"


def size(full: int, smoke: int = 1) -> int:
    """`full` for `make bench`, `smoke` for the smoke test."""
    if SMOKE:
        print(f"(BENCH_SMOKE=1: {smoke} instead of {full}; the figures below only prove the script runs)")
        return smoke
    return full
