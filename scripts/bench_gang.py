#!/usr/bin/env python3
"""The supervisor's side of a lost gang node, on the local AWS: replacement path against whole-gang path.

A gang of 4 (the supervisor's real code, in process; moto delivers no events and has no placement
groups, so they are off as on every local AWS). Each round loses one node:
- replacement: a non-host node is reclaimed (spot warning, then gone); timed from the state-change
  event to the replacement's fleet request, and the whole decision;
- whole gang: the host is reclaimed; the survivors get the stop tag, their agents end them, and the
  next reconcile launches the next attempt's gang; timed from that reconcile to its fleet request.
Counted: AWS calls per path. What a user waits for on AWS is the boot that follows (minutes, not
these milliseconds): docs/architecture.md, "Multi-node runs", prices both paths on paper.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_size import size  # noqa: E402
from bench_supervisor import CallCounter  # noqa: E402

from tests.supervisor.conftest import Account, event  # noqa: E402 - the same account the tests build
from training_infra.local.emulator import Emulator  # noqa: E402
from training_infra.supervisor.runtime.records import MemberState  # noqa: E402
from training_infra.supervisor.runtime.supervisor import SPOT_WARNING, STATE_CHANGE  # noqa: E402

ROUNDS = size(5, 1)
NODES = 4


def _reclaim(account, supervisor, instance_id: str, counter: CallCounter) -> float:
    supervisor.handle(event(SPOT_WARNING, instance_id, **{"instance-action": "terminate"}))
    account.end_instance(instance_id)
    counter.calls.clear()
    started = time.perf_counter()
    supervisor.handle(event(STATE_CHANGE, instance_id, state="terminated"))
    return started


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, Emulator(Path(tmp) / "emulator") as aws:
        os.environ.update(aws.env)  # boto3 clients of the account go to the emulator
        account = Account()
        account.cfg = dataclasses.replace(account.cfg, cooldown_seconds=0, placement_strategy="")
        account.new_run(max_runtime_hours=48, nodes=NODES, instance_types=["g5.xlarge", "g6.xlarge"])
        supervisor = account.supervisor()
        supervisor.reconcile("bert")
        counter = CallCounter(account.ec2, account.dynamodb, account.s3, account.sns)
        replace_fleet, replace_whole, replace_calls = [], [], []
        gang_fleet, gang_calls = [], []
        for _ in range(ROUNDS):
            # Replacement: the last node is lost.
            live = {m.node: m for m in account.run().current.members if m.state == MemberState.RUNNING}
            started = _reclaim(account, supervisor, live[NODES - 1].instance_id, counter)
            replace_whole.append(time.perf_counter() - started)
            replace_fleet.append(next(t for t, name in counter.calls if name == "CreateFleet") - started)
            replace_calls.append(len(counter.calls))
            # Whole gang: the host is lost; the survivors' agents stop on the tag and their boxes end.
            live = {m.node: m for m in account.run().current.members if m.state == MemberState.RUNNING}
            _reclaim(account, supervisor, live[0].instance_id, counter)
            calls = len(counter.calls)
            for node, member in live.items():
                if node:
                    account.end_instance(member.instance_id)
            counter.calls.clear()
            started = time.perf_counter()
            supervisor.reconcile("bert")
            gang_fleet.append(next(t for t, name in counter.calls if name == "CreateFleet") - started)
            gang_calls.append(calls + len(counter.calls))
        run = account.run()
        assert len(run.attempts) == ROUNDS + 1 and len(run.current.members) == NODES, run.attempts
        fleet, whole = statistics.median(replace_fleet), statistics.median(replace_whole)
        print(f"gang of {NODES}, non-host lost -> replacement's fleet request: {fleet:.3f} s median "
              f"(whole decision {whole:.3f} s; {ROUNDS} rounds)")  # fmt: skip
        print(f"gang of {NODES}, host lost -> the next attempt's gang fleet request, once the survivors ended: "
              f"{statistics.median(gang_fleet):.3f} s median")  # fmt: skip
        print(f"AWS calls: replacement {statistics.median(replace_calls):.0f}, whole gang (stop tags + relaunch) "
              f"{statistics.median(gang_calls):.0f} per loss")  # fmt: skip
        print("on AWS both are dominated by the boot that follows: replacement boots 1 box while 3 wait, the whole "
              "gang stops 3 and boots 4 (docs/architecture.md, the recovery paths on paper)")  # fmt: skip


if __name__ == "__main__":
    main()
