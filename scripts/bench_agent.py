"""Benchmark: how fast the real agent reacts to a spot interruption notice.

Runs the rendered user data under bash (process runtime) against a local moto server and a fake
IMDS, with production timings (5 s spot poll, 60 s grace, checkpoints synced every 300 s, so only
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
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training_infra.compute.user_data import AgentConfig, render_user_data  # noqa: E402
from training_infra.local.emulator import FAKE_CREDENTIALS, Emulator  # noqa: E402
from training_infra.local.imds import FakeImds  # noqa: E402

MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 7,
            "digest": "sha256:" + "b" * 64,
        },
        "layers": [],
    }
)


def wait_until(check, timeout: float = 150.0, every: float = 0.1) -> float:
    """Poll `check()` until truthy; return the time.time() it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.time()
        time.sleep(every)
    raise TimeoutError("condition not reached")


def one_round(aws: Emulator, workdir: Path, number: int) -> dict[str, float]:
    session = boto3.Session(
        region_name=aws.region,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    s3 = session.client("s3", endpoint_url=aws.endpoint)
    data_bucket, outputs_bucket, repository = f"bench-data-{number}", f"bench-outputs-{number}", f"bench-{number}"
    for bucket in (data_bucket, outputs_bucket):
        s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(REPO / "examples/data/train.csv"), data_bucket, "data/train.csv")
    session.client("ecr", endpoint_url=aws.endpoint).create_repository(repositoryName=repository)
    session.client("ecr", endpoint_url=aws.endpoint).put_image(
        repositoryName=repository, imageManifest=MANIFEST, imageTag="v1"
    )
    run_id = f"bench-{number}"
    root = workdir / run_id
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in {
        "shutdown": "exit 0",
        "nvidia-smi": "echo 95",
        "poweroff": f"date +%s.%N > {root / 'poweroff'}",
    }.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    config = AgentConfig(
        data_bucket=data_bucket,
        outputs_bucket=outputs_bucket,
        run_id=run_id,
        region=aws.region,
        image_uri=f"123456789012.dkr.ecr.{aws.region}.amazonaws.com/{repository}",
        image_tag="v1",
        training_command=f"{sys.executable} {REPO / 'examples/trainer/train.py'}",
        hourly_price_usd=1.006,
        extra_env="EPOCHS=100000",
    )
    script = root / "user-data.sh"
    script.write_text(render_user_data(config))
    training_log = root / "root/var/log/training.log"
    with FakeImds(instance_id=f"i-bench{number:010d}") as imds:
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(root),
            **aws.env,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url,
            "TI_ROOT": str(root / "root"),
            "TI_RUNTIME": "process",
            "TI_POWEROFF_CMD": str(bin_dir / "poweroff"),
            "TI_SHUTDOWN_BIN": str(bin_dir / "shutdown"),
            "TI_NVIDIA_SMI": str(bin_dir / "nvidia-smi"),
        }
        agent = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: training_log.exists() and "epoch 3/" in training_log.read_text(), timeout=120)
            time.sleep(random.uniform(0, 5))  # noqa: S311 - land anywhere in the 5 s poll cycle
            noticed = time.time()
            imds.inject_spot_interruption()
            found: dict[str, re.Match] = {}

            def trainer_saved() -> bool:
                text = training_log.read_text()
                found["sigterm"] = re.search(r"received SIGTERM at ([0-9.]+)", text)
                found["ckpt"] = re.search(r"checkpoint (ckpt-\d+\.npz) \(on SIGTERM\)", text)
                return bool(found["sigterm"] and found["ckpt"])

            wait_until(trainer_saved, every=0.05)
            ckpt_key = f"checkpoints/{run_id}/{found['ckpt'].group(1)}"

            def exists(key: str, needle: str = "") -> bool:
                try:
                    body = s3.get_object(Bucket=outputs_bucket, Key=key)["Body"].read().decode(errors="replace")
                except s3.exceptions.NoSuchKey:
                    return False
                return needle in body

            figures = {
                "SIGTERM": float(found["sigterm"].group(1)) - noticed,
                "ckpt S3": wait_until(lambda: exists(ckpt_key)) - noticed,
                "logs S3": wait_until(lambda: exists(f"runs/{run_id}/logs/training.log", "received SIGTERM")) - noticed,
                "status": wait_until(lambda: exists(f"runs/{run_id}/status.json", '"interrupted"')) - noticed,
            }
            figures["poweroff"] = (
                float(wait_until(lambda: (root / "poweroff").exists()) and (root / "poweroff").read_text()) - noticed
            )
            agent.wait(timeout=60)
            return figures
        finally:
            if agent.poll() is None:
                agent.kill()


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
