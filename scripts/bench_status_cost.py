#!/usr/bin/env python3
"""`status` and `cost` with 10 runs made and with 1,000: the time must not grow with the team's history.

On the local AWS: the real storage stack (its run table and outputs bucket) deployed with the CDK
CLI, then runs made as a finished managed run leaves them (its record, priced by the supervisor,
and the agent's status files under runs/<id>/), one every 8.76 hours back from now, so 1,000 runs
are a year of a team's work; one in twenty is an older run with status files only, which the first
`status` records in the table; three spot runs are still going (priced at read time from the spot
price history). Timed: `training-infra status` and `training-infra cost --days 30` as a user runs
them (interpreter start included), median of several, after one first call. Target: the time with
1,000 runs at most 1.5 times the time with 10.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
from bench_size import size

from training_infra import naming, pricing
from training_infra.local.emulator import Emulator
from training_infra.local.sandbox import LOCAL_AMI
from training_infra.supervisor.runtime import ledger
from training_infra.supervisor.runtime.records import Attempt, AttemptEnd, Run, RunSpec, RunState, RunStore, iso

ROOT = Path(__file__).resolve().parents[1]
CDK = str(ROOT / "node_modules" / ".bin" / "cdk")
REPEATS = size(5)
MORE_RUNS = size(990, 10)
EVERY = timedelta(hours=8.76)
PRICE = pricing.on_demand_price("g5.xlarge")
# Where the recorded runs ran: ids of the shape the supervisor records (the bench only reads them back).
WHERE = {"subnet_ids": ("subnet-0123456789abcdef0",), "launch_template_id": "lt-0123456789abcdef0",
         "max_runtime_hours": 12}  # fmt: skip


def make_runs(store: RunStore, s3, bucket: str, first: int, count: int, now: datetime) -> None:
    def one(index: int) -> None:
        run_id = f"bench-{index:04d}"
        start = now - EVERY * (index + 1)
        end = start + timedelta(hours=3)
        status = {"run_id": run_id, "attempt": 1, "outcome": "succeeded", "exit_code": 0, "started_at": iso(start),
                  "ended_at": iso(end), "instance_id": f"i-{index:017x}", "instance_type": "g5.xlarge",
                  "market": "on-demand", "availability_zone": "us-east-1a", "hourly_price_usd": PRICE,
                  "estimated_cost_usd": 3 * PRICE, "message": "done"}  # fmt: skip
        body = json.dumps(status).encode()
        s3.put_object(Bucket=bucket, Key=f"runs/{run_id}/status.json", Body=body)
        s3.put_object(Bucket=bucket, Key=f"runs/{run_id}/logs/train.log", Body=b"step 1\n")
        if index % 20 == 19:
            return  # an older run: status files only
        s3.put_object(Bucket=bucket, Key=f"runs/{run_id}/attempts/1/status.json", Body=body)
        spec = RunSpec(market="on-demand", instance_types=("g5.xlarge",), list_prices={"g5.xlarge": PRICE}, **WHERE)
        attempt = Attempt(n=1, instance_id=status["instance_id"], instance_type="g5.xlarge", zone="us-east-1a",
                          market="on-demand", started_at=iso(start), ended_at=iso(end),
                          end_reason=AttemptEnd.SUCCEEDED, exit_code=0)  # fmt: skip
        ledger.record_price(attempt, ledger.price_attempt(attempt, spec, now, None))
        store.create(Run(run_id=run_id, spec=spec, deadline_at=iso(start + timedelta(hours=12)), created_at=iso(start),
                         state=RunState.SUCCEEDED, attempts=[attempt], ended_at=iso(end)))  # fmt: skip

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, range(first, first + count)))


def make_open_spot_runs(store: RunStore, now: datetime) -> None:
    for index in range(3):
        start = now - timedelta(hours=index + 1)
        spec = RunSpec(market="spot", instance_types=("g5.xlarge",), list_prices={"g5.xlarge": PRICE}, **WHERE)
        attempt = Attempt(n=1, instance_id=f"i-0be{index:014x}", instance_type="g5.xlarge", zone="us-east-1a",
                          market="spot", started_at=iso(start))  # fmt: skip
        store.create(Run(run_id=f"bench-open-{index}", spec=spec, deadline_at=iso(start + timedelta(hours=12)),
                         created_at=iso(start), state=RunState.RUNNING, attempts=[attempt]))  # fmt: skip


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(env: dict[str, str]) -> dict[str, tuple[float, float]]:
    """verb -> (first call, median of the next REPEATS)."""
    figures = {}
    for verb in ("status", "cost"):
        argv = [sys.executable, "-m", "training_infra", verb, *(["--days", "30"] if verb == "cost" else [])]
        first = timed(argv, env)
        figures[verb] = (first, statistics.median(timed(argv, env) for _ in range(REPEATS)))
    return figures


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, Emulator(Path(tmp) / "emulator") as aws:
        env = {**os.environ, **aws.env, "CDK_DISABLE_VERSION_CHECK": "true", "AWS_REGION": aws.region}
        os.environ.update(aws.env)  # this script's own clients too
        out = f"{tmp}/cdk.out"
        subprocess.run([CDK, "bootstrap", f"aws://123456789012/{aws.region}", "--no-notices", "--output", out],
                       cwd=ROOT, env=env, check=True, capture_output=True)  # fmt: skip
        subprocess.run([CDK, "deploy", naming.STORAGE_STACK, "--method=direct", "--require-approval", "never",
                        "--no-notices", "--output", out, "-c", f"image_id={LOCAL_AMI}"],
                       cwd=ROOT, env=env, check=True, capture_output=True)  # fmt: skip
        cloudformation = boto3.client("cloudformation", region_name=aws.region, endpoint_url=aws.endpoint)
        outputs = {
            o["OutputKey"]: o["OutputValue"]
            for o in cloudformation.describe_stacks(StackName=naming.STORAGE_STACK)["Stacks"][0]["Outputs"]
        }
        store = RunStore(
            boto3.client("dynamodb", region_name=aws.region, endpoint_url=aws.endpoint),
            outputs[naming.OUTPUT_RUN_TABLE],
        )
        s3 = boto3.client("s3", region_name=aws.region, endpoint_url=aws.endpoint)
        bucket = outputs[naming.OUTPUT_OUTPUTS_BUCKET]
        now = datetime.now(UTC)
        make_open_spot_runs(store, now)
        make_runs(store, s3, bucket, 0, 10, now)
        small = measure(env)
        made = time.perf_counter()
        make_runs(store, s3, bucket, 10, MORE_RUNS, now)
        print(f"(made {MORE_RUNS} more runs in {time.perf_counter() - made:.0f} s)")
        large = measure(env)
        total = 10 + MORE_RUNS
        in_window = sum(1 for i in range(total) if EVERY * (i + 1) <= timedelta(days=30))
        for verb in ("status", "cost"):
            (first_10, t_10), (first_1000, t_1000) = small[verb], large[verb]
            print(
                f"training-infra {verb}: {t_10:.2f} s with 10 runs, {t_1000:.2f} s with {total:,} "
                f"(ratio {t_1000 / t_10:.2f}, target <= 1.5); first call after the new runs: "
                f"{first_10:.2f} s / {first_1000:.2f} s (records the older runs once)"
            )
        print(f"(cost --days 30 reads the {in_window} runs made in those 30 days, not the {total:,})")


if __name__ == "__main__":
    main()
