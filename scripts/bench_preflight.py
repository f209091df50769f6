#!/usr/bin/env python3
"""How long the launch preflight takes on the local AWS (target: under 1 s of the CLI's own time).

A moto server on loopback with the four stacks the CLI tests deploy (real output keys, a launch
template, a VPC with two zones, an image pushed, a dataset uploaded). Timed in-process, a new
session and clients each round as in a new CLI process: the preflight's checks (`preflight.run`),
the CLI's own time (the CPU this process spent on them, every thread; the emulator is another
process) and the wall time with the emulator's answers; the first round also loads the service
models and warms the emulator. Counted: AWS calls per `launch --dry-run`. Timed as a user runs it: `training-infra
launch --dry-run` in a fresh process (Python start, imports, stack outputs, template, preflight).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_size import size  # noqa: E402

from tests.cli.conftest import deploy  # noqa: E402 - the same stacks the CLI tests deploy
from training_infra.cli import launching, preflight  # noqa: E402
from training_infra.cli.aws import Aws  # noqa: E402
from training_infra.local.emulator import Emulator  # noqa: E402

ROUNDS = size(5)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, Emulator(Path(tmp) / "emulator") as emulator:
        os.environ.update({**emulator.env, "XDG_CACHE_HOME": f"{tmp}/cache"})  # the price cache, not the user's
        deploy(emulator, emulator.region)
        walls, owns, calls = [], [], []
        original = preflight.run

        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                wall = time.perf_counter() - start
                walls.append(wall)
                owns.append(time.process_time() - cpu)  # this process's CPU, every thread: the CLI's own work

        preflight.run = timed
        for round_number in range(ROUNDS):
            aws = Aws()
            made: list[str] = []
            aws.session.register("before-call", lambda model, made=made, **_: made.append(model.name))
            request = launching.validate(
                launching.LaunchRequest(run_id=f"bench-preflight-{round_number}", dry_run=True, max_price="0.9")
            )
            launching.launch(aws, request)
            calls.append(len(made))
        preflight.run = original

        processes = []
        for round_number in range(size(3)):
            start = time.perf_counter()
            command = ["launch", "--dry-run", "--run-id", f"bench-cli-{round_number}"]
            subprocess.run(
                [sys.executable, "-m", "training_infra", *command], cwd=ROOT, env=os.environ.copy(), check=True,
                capture_output=True,
            )  # fmt: skip
            processes.append(time.perf_counter() - start)

        print(
            f"preflight, the CLI's own time (its CPU): median {statistics.median(owns):.3f} s "
            f"(first {owns[0]:.3f} s, {ROUNDS} rounds); target < 1 s"
        )
        print(
            f"preflight, in all (with the local AWS's answers): median {statistics.median(walls):.3f} s "
            f"(first {walls[0]:.3f} s: service models loaded, emulator warming up)"
        )
        print(f"preflight: AWS calls per launch --dry-run (stack, template, checks): {statistics.median(calls):.0f}")
        print(
            f"training-infra launch --dry-run, a fresh process each time: median {statistics.median(processes):.2f} s "
            f"(first {processes[0]:.2f} s; Python start and imports included)"
        )


if __name__ == "__main__":
    main()
