#!/usr/bin/env python3
"""Whole-app synth time as a ratio to an empty CDK app's synth, same machine, same run.

Both are separate Python processes (as `cdk synth` runs them), so the ratio shows what this
app adds on top of the fixed cost of starting jsii and the CDK library. Target: <= 1.5x.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_size import size

ROOT = Path(__file__).resolve().parents[1]
EMPTY_APP = "import aws_cdk as cdk; cdk.App(builtin_cloud_formation_validation=False).synth()"
ROUNDS = size(3)


def timed(argv: list[str], context: dict) -> float:
    with tempfile.TemporaryDirectory() as outdir:
        env = {**os.environ, "CDK_CONTEXT_JSON": json.dumps(context), "CDK_OUTDIR": outdir}
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    context = json.loads((ROOT / "cdk.json").read_text())["context"]
    configurations = {
        "defaults": context,
        "everything on": {
            **context,
            "github_repo": "acme/trainer",
            "alert_email": "ml@example.com",
            "create_instance": True,
            "image_id": "ami-0123456789abcdef0",
        },
    }
    empty = statistics.median(timed([sys.executable, "-c", EMPTY_APP], context) for _ in range(ROUNDS))
    print(f"empty CDK app synth: {empty:.2f} s (median of {ROUNDS})")
    for name, ctx in configurations.items():
        whole = statistics.median(timed([sys.executable, "app.py"], ctx) for _ in range(ROUNDS))
        print(
            f"training-infra synth ({name}, 4 stacks, cdk-nag): {whole:.2f} s "
            f"-> ratio {whole / empty:.2f}x (target <= 1.5x)"
        )


if __name__ == "__main__":
    main()
