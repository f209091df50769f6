"""Benchmark: node loss to training again for a 2-node gang on the local AWS, both recovery paths.

Runs `make demo-multinode` (training_infra/local/demo.py, GangDemo): the sandbox's moto server and EC2
player, the REAL supervisor handler on the state-change and spot-warning events, the real agents,
torchrun and PyTorch DDP over gloo. In one run, node 1 (not the rendezvous host) is reclaimed and
replaced in the same attempt, then node 0 (the host) is reclaimed and the whole gang relaunches. Prints,
from the spot notice to the first training step after the resume:
  * replacement - a non-host lost: its final save, the supervisor's replacement, the new agent's
                  restore, torch's import and the rendezvous with the survivors;
  * whole gang  - the host lost: every node stops, the next attempt's fleet, restore and rendezvous;
and the same on AWS on paper, where an instance's boot (and image pull) is added to each path.
Usage: python scripts/bench_gang_local.py [--boot-minutes 5]. Prints figures; asserts nothing. Not in the
bench smoke pass: tests/test_local_gang.py runs the same demo once and prints its story through `report`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from training_infra.local.demo import GangStory, gang_story  # noqa: E402


def report(story: GangStory, *, boot_minutes: float = 5.0) -> list[str]:
    """The figures of one demo: each path here and on AWS on paper (tests/test_local_gang.py prints its own
    story through this, so the smoke pass does not run a second demo)."""
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"node loss to training again, 2-node gang on the local AWS (load average {load}, {os.cpu_count()} cores):"
    ]
    boot = boot_minutes * 60
    for loss in story.losses:
        on_aws = (loss.seconds_to_training + boot) / 60
        lines.append(f"  {loss.path:<12} node {loss.node} lost: {loss.seconds_to_training:6.1f} s here; "
                     f"on AWS about {on_aws:4.1f} min (+ {boot_minutes:g} min boot and pull)")  # fmt: skip
    if len(story.losses) == 2:
        replacement, whole = (loss.seconds_to_training for loss in story.losses)
        aws_ratio = (whole + boot) / (replacement + boot)
        lines.append(f"  whole gang / replacement: {whole / replacement:.2f}x here, "
                     f"{aws_ratio:.2f}x on AWS (boot dominates; docs/architecture.md)")  # fmt: skip
    lines.append(f"  outcome: {story.status.get('outcome', '?')} after {len(story.losses)} node loss(es)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boot-minutes", type=float, default=5.0, help="an instance's boot and image pull on AWS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gang-local-") as folder:
        story = gang_story(Path(folder) / "demo")
    print("\n" + "\n".join(report(story, boot_minutes=args.boot_minutes)))
    return 0 if len(story.losses) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
