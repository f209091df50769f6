#!/usr/bin/env python3
"""Interruption to training again: relaunch after the old box ends vs a replacement on the spot notice.

On the local AWS (a moto server on loopback), with the supervisor's real handler deciding (EventBridge's
exact warning and state-change events handed to it in-process: moto delivers none) and the replacement
agent's real handover wait (ti_agent/handover.py). Boot, final save and restore times cannot happen here,
so they are injected: the timeline adds them to the decisions' measured wall time.

- before: the warned box saves (at most the two-minute notice), powers off, EC2 says it ended, the
  supervisor relaunches; the new box boots, restores, trains: end + decision + boot + restore.
- now: the warning itself makes the supervisor launch the next attempt on another pool; the new box
  boots while the old one saves, waits for the old attempt's final status.json (bounded), restores:
  decision + max(boot, save) + restore (the wait ends at the final status, or at the bound).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_size import size  # noqa: E402

from tests.supervisor.conftest import Account, event  # noqa: E402 - the same account the tests build
from training_infra.compute.agent.ti_agent import handover  # noqa: E402
from training_infra.local.emulator import Emulator  # noqa: E402
from training_infra.supervisor.runtime.records import parse_iso  # noqa: E402
from training_infra.supervisor.runtime.replacement import UNTIL_TAG  # noqa: E402
from training_infra.supervisor.runtime.supervisor import SPOT_WARNING, STATE_CHANGE  # noqa: E402

NOTICE = 120.0
RESTORE = 20.0  # seconds to pull the newest complete checkpoint (injected, the same both ways)
# (boot, final save) in seconds: a warm small image, a typical DLAMI GPU box, a slow one; saves short and long.
CASES = size([(90, 30), (90, 110), (240, 60), (300, 100), (300, 150)], [(240, 60)])


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _decide(account, supervisor, handle_event) -> float:
    started = time.perf_counter()
    supervisor.handle(handle_event)
    return time.perf_counter() - started


def before(account, run_id: str, boot: float, save: float) -> float:
    """Relaunch once the old box ended (the supervisor before issue 28's replacement)."""
    supervisor = account.supervisor()
    current = account.run(run_id).current
    old = current.instance_id
    # The warning only noted on the attempt, as the supervisor did before the replacement (no launch on it).
    supervisor._mark(run_id, current.n, "reclaim_warned_at", "2026-11-29T08:00:00Z")
    ends = min(save, NOTICE)  # the agent powers off after its final save; EC2 takes the box at the notice's end
    account.end_instance(old)
    decision = _decide(account, supervisor, event(STATE_CHANGE, old, state="terminated"))
    new = account.run(run_id).current
    assert new is not None and new.instance_id and new.instance_id != old, "relaunched after the end"
    return ends + decision + boot + RESTORE


def now(account, run_id: str, boot: float, save: float) -> float:
    """The replacement on the notice, and the new agent's handover wait."""
    supervisor = account.supervisor()
    old = account.run(run_id).current
    decision = _decide(account, supervisor, event(SPOT_WARNING, old.instance_id, **{"instance-action": "terminate"}))
    new = account.run(run_id).current
    assert new is not None and new.replaces == old.n and new.instance_id, f"not launched on the notice: {new}"
    tags = {t["Key"]: t["Value"] for t in _described(account, new.instance_id)["Tags"]}
    warned = parse_iso(account.run(run_id).attempts[old.n - 1].reclaim_warned_at)
    clock = VirtualClock()
    clock.now = decision + boot  # the new agent reaches its restore, seconds after the warning
    bound = handover.wait_bound(tags[UNTIL_TAG], warned.timestamp() + clock.now)  # as the agent reads its tag
    final_status_at = save if save <= NOTICE else None  # a save longer than the notice never finishes
    found = handover.wait_for_replaced(
        old.n, lambda _n: final_status_at is not None and clock.now >= final_status_at, wait_seconds=bound,
        clock=clock, sleep=clock.sleep,
    )  # fmt: skip
    account.end_instance(old.instance_id)
    supervisor.handle(event(STATE_CHANGE, old.instance_id, state="terminated"))
    assert found.final_status_seen == (final_status_at is not None)
    return clock.now + RESTORE


def _described(account, instance_id: str) -> dict:
    return account.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, Emulator(Path(tmp) / "emulator") as aws:
        os.environ.update(aws.env)
        print(f"interruption -> training again, restore {RESTORE:.0f} s, notice {NOTICE:.0f} s "
              "(boot and save injected):")  # fmt: skip
        account = Account()
        account.cfg = dataclasses.replace(account.cfg, cooldown_seconds=0)
        for case, (boot, save) in enumerate(CASES):
            figures = {}
            for name, policy in (("before", before), ("now", now)):
                run_id = f"{name}-{case}"
                account.new_run(run_id, max_runtime_hours=48)
                account.supervisor().reconcile(run_id)
                figures[name] = policy(account, run_id, boot, save)
            gain = figures["before"] - figures["now"]
            paper = max(boot, min(save, NOTICE)) + RESTORE
            print(f"  boot {boot:>3} s, save {save:>3} s: before {figures['before']:6.1f} s, "
                  f"now {figures['now']:6.1f} s ({gain:+.1f} s, {figures['before'] / figures['now']:.2f}x; "
                  f"max(boot, save) + restore = {paper:.0f} s)")  # fmt: skip
        print("overlap billed per interruption: at most the notice (120 s) of the old box, counted in the run's cost")


if __name__ == "__main__":
    main()
