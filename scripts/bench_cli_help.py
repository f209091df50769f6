#!/usr/bin/env python3
"""`training-infra --help` and `launch --help` as a user runs them (interpreter start included): median
wall and CPU time of 7, against a bare `python -c pass` and `import typer` for scale. Target: under 0.5 s.

The verbs import AWS libraries, rich and their helpers when they run, not for help (issue 27): the
modules `--help` loads are listed too, so a new top-level import of botocore shows up here.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("training-infra")
from bench_size import size  # noqa: E402 - python puts the script's folder on sys.path

RUNS = size(7, 1)


def timed(argv: list[str]) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of the child) of RUNS runs."""
    walls, cpus = [], []
    for _ in range(RUNS):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "COLUMNS": "80"})
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    rows = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("python -c 'import typer'", [sys.executable, "-c", "import typer"]),
        ("training-infra --help", [str(SCRIPT), "--help"]),
        ("training-infra launch --help", [str(SCRIPT), "launch", "--help"]),
    ]
    print(f"{'command':<32} {'wall s':>7} {'cpu s':>7}")
    for name, argv in rows:
        wall, cpu = timed(argv)
        print(f"{name:<32} {wall:7.3f} {cpu:7.3f}")
    probe = "import sys; from training_infra.cli.main import app; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    heavy = [name for name in ("botocore", "boto3", "rich", "plotext", "matplotlib") if f"'{name}'" in loaded]
    print(f"heavy modules imported for --help: {', '.join(heavy) or 'none'}")


if __name__ == "__main__":
    main()
