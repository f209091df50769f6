"""Benchmark: time to the first step against the slowest transfer and against their sum (issue 29).

Runs the real agent (the rendered user data, on the local moto server, with the agent tests'
harness, tests/agent/agent_harness.py) on the `docker` runtime with a stand-in engine whose pull
takes as long as an image of the mix's size on a 1 MB/s registry link (`fake_docker`), and the
data and checkpoint objects through the harness's proxy throttled to a shared 1 MB/s link each.
Three mixes: image-heavy, data-heavy, checkpoint-heavy. For each it prints, in seconds:
  * parts        - each transfer as the agent measured it (status.json `cold_start`);
  * cold start   - the agent's whole cold start (first transfer started to last one done);
  * first step   - from the transfers' start (status.json `cold_start.started_at`) to the trainer's
                   first step by the engine's clock (the time to the first training step);
  * vs slowest / vs sum - the first step's ratio to the slowest part and to the sum of the parts
                   (one after another, as before issue 29, the first step would be the sum).
Usage: python scripts/bench_coldstart.py [--rounds 1]. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "agent")]

from agent_harness import Throttle, fake_docker, new_run  # noqa: E402 - the agent tests' harness
from bench_size import SMOKE, size  # noqa: E402 - scripts/ is on the path when a script runs

from training_infra.local.emulator import Emulator  # noqa: E402

MB = 1024 * 1024
CHUNK_MB = 4  # objects under the AWS CLI's 8 MB multipart threshold: one GET each
# (image seconds at 1 MB/s, data MB, checkpoint MB) at scale 1
MIXES = {
    "image-heavy": (12, 3, 2),
    "data-heavy": (2, 12, 3),
    "checkpoint-heavy": (2, 3, 12),
}
FAST = {"TI_RETRY_BASE_SECONDS": "1", "TI_LOG_SHIP_SECONDS": "5"}


def put_chunks(s3, bucket: str, prefix: str, megabytes: float) -> None:
    left, n = int(megabytes * MB), 0
    while left > 0:
        part = min(left, CHUNK_MB * MB)
        s3.put_object(Bucket=bucket, Key=f"{prefix}part-{n:03}.bin", Body=os.urandom(part))
        left, n = left - part, n + 1


def one_round(aws: Emulator, workdir: Path, mix: tuple[float, float, float]) -> dict[str, float]:
    image_seconds, data_mb, checkpoint_mb = mix
    run_id = f"bench-{workdir.name}"
    engine = workdir / "engine"
    env = {**FAST, **fake_docker(engine, pull_seconds=image_seconds)}
    run = new_run(aws, workdir / "run", env=env, run_id=run_id, training_command="", max_runtime_seconds=600)
    try:
        put_chunks(run.s3, run.config.data_bucket, "data/big/", data_mb)
        put_chunks(run.s3, run.config.outputs_bucket, f"checkpoints/{run_id}/", checkpoint_mb)
        run.proxy.throttles += [Throttle(run.config.data_bucket, MB), Throttle("/checkpoints/", MB)]
        run.run(timeout=600)
        cold = run.status()["cold_start"]
        said = {}
        for line in (engine / "calls.log").read_text().splitlines():
            at, _, what = line.partition(" ")
            said.setdefault(what, float(at))
        # From the transfers' start (the agent's wall clock before its first fork) to the trainer's
        # first step by the engine's clock: the figure, the agent's own work after the
        # transfers and `docker run` included.
        return {
            **{f"part {name}": seconds for name, seconds in cold["parts"].items()},
            "cold start": cold["total_seconds"],
            "first step": said["first-step"] - cold["started_at"],
            "slowest": max(cold["parts"].values()),
            "sum": sum(cold["parts"].values()),
        }
    finally:
        run.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    scale = size(4, 1) / 4  # the smoke pass: a quarter of each size
    rounds = 1 if SMOKE else args.rounds
    mixes = list(MIXES.items())[: size(len(MIXES), 1)]  # the smoke pass: one mix (the same steps as the others)
    print(f"{'mix':18} {'image':>6} {'data':>6} {'ckpt':>6} {'cold':>6} {'1st step':>8} {'slowest':>7} {'sum':>6}"
          f" {'vs slowest':>10} {'vs sum':>7}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, Emulator(Path(tmp) / "moto") as aws:
        for name, mix in mixes:
            for n in range(rounds):
                got = one_round(aws, Path(tmp) / f"{name}-{n}", tuple(value * scale for value in mix))
                print(
                    f"{name:18} {got['part image']:6.1f} {got['part data']:6.1f} {got['part checkpoints']:6.1f}"
                    f" {got['cold start']:6.1f} {got['first step']:8.1f} {got['slowest']:7.1f} {got['sum']:6.1f}"
                    f" {got['first step'] / got['slowest']:10.2f} {got['first step'] / got['sum']:7.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
