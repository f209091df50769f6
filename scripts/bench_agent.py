"""Benchmark: how fast the real agent reacts to a spot interruption notice.

Runs the rendered user data under bash (process runtime) against a local moto server and a fake
IMDS, set up by the agent tests' harness (tests/agent/agent_harness.py), with production timings (5 s spot poll, 60 s grace, checkpoints synced every 300 s, so only
the notice path can save the checkpoint), and the example trainer at its default pace. For each
round it injects a notice at a random moment and prints, from the notice:
  * SIGTERM  - when the trainer's handler ran (its own log line);
  * ckpt S3  - when the checkpoint written on SIGTERM was readable in S3;
  * logs S3  - when runs/<id>/logs/training.log in S3 contained the SIGTERM line;
  * status   - when status.json (outcome interrupted) was in S3;
  * poweroff - when the power-off command ran.
AWS gives 120 s. Usage: python scripts/bench_agent.py [--rounds 3]. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "agent")]

from agent_harness import new_run  # noqa: E402 - the agent tests' harness: same fakes, same setup

from training_infra.local.emulator import Emulator  # noqa: E402


def wait_until(check, timeout: float = 150.0, every: float = 0.1) -> float:
    """Poll `check()` until truthy; return the time.time() it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.time()
        time.sleep(every)
    raise TimeoutError("condition not reached")


def one_round(aws: Emulator, workdir: Path, number: int) -> dict[str, float]:
    run_id = f"bench-{number}"
    # Production timings (AgentConfig defaults); only the trainer runs "forever".
    run = new_run(aws, workdir / run_id, run_id=run_id, extra_env="EPOCHS=100000")
    s3, bucket = run.s3, run.config.outputs_bucket
    try:
        run.start()
        run.wait_for_log(r"epoch 3/", timeout=120)
        time.sleep(random.uniform(0, 5))  # noqa: S311 - land anywhere in the 5 s poll cycle
        noticed = time.time()
        run.imds.inject_spot_interruption()
        found: dict[str, re.Match | None] = {}

        def trainer_saved() -> bool:
            text = run.training_log
            found["sigterm"] = re.search(r"received SIGTERM at ([0-9.]+)", text)
            found["ckpt"] = re.search(r"checkpoint (ckpt-\d+\.npz) \(on SIGTERM\)", text)
            return bool(found["sigterm"] and found["ckpt"])

        wait_until(trainer_saved, every=0.05)
        ckpt_key = f"checkpoints/{run_id}/{found['ckpt'].group(1)}"

        def exists(key: str, needle: str = "") -> bool:
            try:
                body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode(errors="replace")
            except s3.exceptions.NoSuchKey:
                return False
            return needle in body

        figures = {
            "SIGTERM": float(found["sigterm"].group(1)) - noticed,
            "ckpt S3": wait_until(lambda: exists(ckpt_key)) - noticed,
            "logs S3": wait_until(lambda: exists(f"runs/{run_id}/logs/training.log", "received SIGTERM")) - noticed,
            "status": wait_until(lambda: exists(f"runs/{run_id}/status.json", '"interrupted"')) - noticed,
        }
        wait_until(lambda: run.called("poweroff"))
        figures["poweroff"] = next(at for at, call in run.calls if call.startswith("poweroff")) - noticed
        run.wait(timeout=60)
        return figures
    finally:
        run.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="notices to inject (one agent run each)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} is not allowed: use 1 or more")
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp, Emulator(Path(tmp) / "moto") as aws:
        rounds = []
        for number in range(args.rounds):
            figures = one_round(aws, Path(tmp), number)
            rounds.append(figures)
            print(
                f"round {number + 1}: " + "  ".join(f"{name} {value:5.1f}s" for name, value in figures.items()),
                flush=True,
            )
    print("\nseconds after the spot notice (AWS reclaims the instance at 120 s)")
    print(f"{'':10}{'min':>7}{'median':>8}{'max':>7}")
    for name in rounds[0]:
        values = [r[name] for r in rounds]
        print(f"{name:10}{min(values):7.1f}{statistics.median(values):8.1f}{max(values):7.1f}")


if __name__ == "__main__":
    main()
