#!/usr/bin/env python3
"""The local AWS to work in (`make local`): how soon it is ready, how soon a launched run trains, what it costs idle.

- ready: from `training-infra local up` to its state file saying ready (moto, the real CDK
  bootstrap + deploy of four stacks, the image into ECR, the declared-vs-held check); target <= 60 s;
- launch to trainer start: from `training-infra launch` until the trainer's first line on the played
  instance (supervisor in process, the sandbox finds the instance, plays its user data, the agent
  boots and starts the trainer), median of several runs; target <= 10 s;
- idle: CPU of the sandbox and its moto server over a quiet window, as % of one core; target <= 5 %.
The supervisor's schedule is AWS's (60 s), as `make local` runs it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_size import size

from training_infra.local.sandbox import SandboxState, stop_running, wait_ready

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "examples" / "trainer" / "train.py"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def trainer_started(folder: Path, run_id: str) -> bool:
    for log in (folder / "instances").glob("i-*/fs/var/log/training.log"):
        text = log.read_text(errors="replace")
        if "[trainer]" in text and f"run {run_id}" in text:
            return True
    return False


def main() -> None:
    launches, idle_seconds = size(3, 1), size(60, 3)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TRAINING_INFRA_"))}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sandbox"
        started = time.monotonic()
        sandbox = subprocess.Popen(
            [sys.executable, "-m", "training_infra", "local", "up", "--dir", str(folder)],
            cwd=ROOT, env=clean, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            state = wait_ready(folder, sandbox, timeout=600)
            ready = time.monotonic() - started
            env = {**clean, **state.env, "TRAINING_INFRA_LOCAL": str(folder)}
            cli = [sys.executable, "-m", "training_infra"]
            subprocess.run([*cli, "upload", str(ROOT / "examples" / "data")], env=env, check=True, capture_output=True)
            to_trainer = []
            for n in range(launches):
                run_id = f"bench-{n}"
                before = time.monotonic()
                subprocess.run(
                    [*cli, "launch", "-q", "--run-id", run_id, "--command", f"python3 {TRAINER}",
                     "--env", "EPOCHS=2", "--env", "STEP_SECONDS=0.1", "--max-runtime-hours", "1"],
                    env=env, check=True, capture_output=True,
                )  # fmt: skip
                while not trainer_started(folder, run_id):
                    if time.monotonic() - before > 120:
                        raise SystemExit(f"run {run_id}: the trainer did not start within 120 s")
                    time.sleep(0.05)
                to_trainer.append(time.monotonic() - before)
                subprocess.run([*cli, "logs", run_id, "-f"], env=env, check=True, capture_output=True, timeout=300)
            moto = int((folder / "emulator" / "moto.pid").read_text())
            time.sleep(2)  # the last run's events settle
            cpu_before, wall_before = cpu_seconds(sandbox.pid) + cpu_seconds(moto), time.monotonic()
            time.sleep(idle_seconds)
            idle = (cpu_seconds(sandbox.pid) + cpu_seconds(moto) - cpu_before) / (time.monotonic() - wall_before)
        finally:
            stop_running(folder)
            sandbox.wait(timeout=120)
    print(f"make local ready:            {ready:5.1f} s  (its own count: {state.ready_seconds} s; target <= 60 s)")
    print(
        f"launch to trainer start:     {statistics.median(to_trainer):5.1f} s median of {launches} "
        f"({', '.join(f'{t:.1f}' for t in to_trainer)}; target <= 10 s)"
    )
    print(f"idle sandbox + moto:         {idle * 100:5.1f} % of one core over {idle_seconds} s (target <= 5 %)")
    assert SandboxState.read(folder) is None


if __name__ == "__main__":
    main()
