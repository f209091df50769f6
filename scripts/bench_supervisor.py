#!/usr/bin/env python3
"""How fast the supervisor relaunches a reclaimed run, and how many AWS calls a decision takes.

On the local AWS (a moto server on loopback): a run with two types in two zones; each round AWS
"reclaims" the live attempt (spot warning, then the instance terminates), and the EventBridge
state-change event goes to the supervisor's real handler logic in-process (moto delivers no events
and runs no Lambda). Timed: from the handler's start to its EC2 Fleet request (target < 2 s of the
supervisor's own time), and the whole decision; counted: AWS calls per decision.
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

from tests.supervisor.conftest import Account, event  # noqa: E402 - the same account the tests build
from training_infra.local.emulator import Emulator  # noqa: E402
from training_infra.supervisor.runtime.supervisor import SPOT_WARNING, STATE_CHANGE  # noqa: E402

ROUNDS = size(6, 2)


class CallCounter:
    def __init__(self, *clients) -> None:
        self.calls: list[tuple[float, str]] = []
        for client in clients:
            client.meta.events.register("before-call", self._count)

    def _count(self, model, **_kwargs) -> None:
        self.calls.append((time.perf_counter(), model.name))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, Emulator(Path(tmp) / "emulator") as aws:
        os.environ.update(aws.env)  # boto3 clients of the account go to the emulator
        account = Account()
        account.cfg = dataclasses.replace(
            account.cfg, cooldown_seconds=0
        )  # every pool stays eligible round after round
        account.new_run(max_runtime_hours=48)
        supervisor = account.supervisor()
        supervisor.reconcile("bert")
        counter = CallCounter(account.ec2, account.dynamodb, account.s3, account.sns)
        to_fleet, whole, calls = [], [], []
        for _ in range(ROUNDS):
            instance_id = account.run().current.instance_id
            # The next attempt starts on the spot notice (the replacement on the notice, issue 28), not
            # when the old box ends: the decision timed is the warning's.
            counter.calls.clear()
            started = time.perf_counter()
            supervisor.handle(event(SPOT_WARNING, instance_id, **{"instance-action": "terminate"}))
            whole.append(time.perf_counter() - started)
            fleet_at = next(t for t, name in counter.calls if name == "CreateFleet")
            account.end_instance(instance_id)
            supervisor.handle(event(STATE_CHANGE, instance_id, state="terminated"))
            to_fleet.append(fleet_at - started)
            calls.append(len(counter.calls))
        run = account.run()
        assert len(run.attempts) == ROUNDS + 1, run.attempts
        print(f"supervisor: spot notice -> next attempt's fleet request: {statistics.median(to_fleet):.3f} s median "
              f"(max {max(to_fleet):.3f} s over {ROUNDS} relaunches; target < 2 s)")  # fmt: skip
        print(
            f"supervisor: whole relaunch decision (classify, claim, fleet, record, notice): "
            f"{statistics.median(whole):.3f} s median"
        )
        print(
            f"supervisor: AWS calls per relaunch decision: {statistics.median(calls):.0f} "
            f"(min {min(calls)}, max {max(calls)})"
        )
        print(f"supervisor: to-fleet time is {2.0 / statistics.median(to_fleet):.1f}x inside the 2 s target")


if __name__ == "__main__":
    main()
