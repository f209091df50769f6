"""Benchmark: a two-node gang on this machine, the real agents, torchrun (c10d) and PyTorch DDP over gloo.

Uses the gang harness of the agent tests (tests/agent/gang_harness.py: each node its own agent, root
and fake IMDS, all on one moto server; the supervisor's tagging is played by the script). Prints, per
round:
  * setup        - the supervisor's tags set (node, rendezvous) to both trainers started (each agent's
                   image check, data sync and restore: AWS CLI calls);
  * rendezvous   - both trainers started to both ranks in the process group (torchrun and the worker
                   import torch, c10d rendezvous, gloo process group);
  * first step   - the tags set to the first training step;
  * replacement  - a non-host node's spot notice to training again (the first step after the resume),
                   a replacement agent started as soon as the lost node's agent ended and its last step
                   was complete in S3 (here a replacement boots in seconds; on AWS its boot dominates);
  * whole gang   - the host's spot notice to training again in the next attempt (two fresh agents).
Usage: python scripts/bench_gang_agent.py [--rounds 2]. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "agent")]

from bench_size import size  # noqa: E402 - scripts/ is on the path when a script runs
from gang_harness import Gang, free_port, new_gang  # noqa: E402 - the agent tests' gang harness

from training_infra.local.emulator import Emulator  # noqa: E402

TRAINING = "STEPS=100000\nSTEP_SECONDS=0.2\nCHECKPOINT_EVERY=4\nKEEP_CHECKPOINTS=3"


def when(pattern: str, run, *, after: int = 0, timeout: float = 180) -> float:
    """time.time() when `pattern` first showed in the node's training log (polled every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, run.training_log[after:]):
            return time.time()
        time.sleep(0.1)
    raise SystemExit(f"{pattern!r} not in {run.tmp.name}'s log after {timeout}s:\n{run.training_log[-3000:]}")


def one_round(aws: Emulator, folder: Path) -> dict[str, float]:
    gang = new_gang(aws, folder, extra_env=TRAINING)
    try:
        rendezvous = f"127.0.0.1:{free_port()}"
        node0, node1 = gang.node(0, attempt=1), gang.node(1, attempt=1)
        node0.start(), node1.start()
        while not all("gang of 2 nodes: waiting" in run.setup_log for run in (node0, node1)):
            time.sleep(0.1)
        placed = time.time()
        Gang.place([node0, node1], rendezvous)
        started = max(when(r"starting trainer", run) for run in (node0, node1))
        joined = max(when(r"joined the process group: 2 ranks", run) for run in (node0, node1))
        first = when(r"\] step 1/", node0)
        gang.wait_for_complete(at_least=4, timeout=120)

        lost = time.time()
        mark = len(node0.training_log)
        node1.imds.inject_spot_interruption()
        node1.wait(timeout=120)
        saved = int(re.findall(r"checkpoint step-(\d+)", node1.training_log)[-1])
        gang.wait_for_complete(at_least=saved, timeout=60)
        replacement = gang.node(1, attempt=1, rendezvous=rendezvous, name="replacement").start()
        again = when(rf"\] step {saved + 1}/", node0, after=mark)

        host_lost = time.time()
        node0.imds.inject_spot_interruption()
        node0.wait(timeout=120)
        last = int(re.findall(r"checkpoint step-(\d+)", node0.training_log)[-1])
        replacement.imds.set_tag("training-infra:stop", "gang")
        replacement.wait(timeout=120)
        gang.wait_for_complete(at_least=last, timeout=60)
        fresh = [gang.node(k, attempt=2) for k in range(2)]
        for run in fresh:
            run.start()
        Gang.place(fresh, f"127.0.0.1:{free_port()}")
        relaunched = when(rf"\] step {last + 1}/", fresh[0])
        return {
            "setup": started - placed,
            "rendezvous": joined - started,
            "first step": first - placed,
            "replacement": again - lost,
            "whole gang": relaunched - host_lost,
        }
    finally:
        gang.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    rounds = size(parser.parse_args().rounds, 1)
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, Emulator(Path(tmp) / "moto") as aws:
        for n in range(rounds):
            got = one_round(aws, Path(tmp) / f"round{n}")
            print("round", n + 1, "  ".join(f"{k} {v:.1f} s" for k, v in got.items()), flush=True)
            for key, value in got.items():
                figures.setdefault(key, []).append(value)
    print(f"two-node gang on this machine ({rounds} round(s); median):")
    for key, values in figures.items():
        print(f"  {key:<12} {statistics.median(values):6.1f} s")
    print(f"load average while measuring: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print("On AWS a replacement adds its boot (EC2 Fleet instant + AMI boot + agent + image pull: minutes), the")
    print("whole-gang path the boot of N nodes at once (all-or-nothing: the slowest member); see docs/agent.md.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
