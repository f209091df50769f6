#!/usr/bin/env python3
"""Sweeps: the supervisor's time per decision for a group of 100 members, and the run table's items and reads for a
sweep of 1,000 trials.

All in one process against moto (the run table, EC2 and S3 of the local AWS, in memory) with real Optuna 5:
1. A group with 100 members running: every member's progress.json carries a new intermediate value and one member
   has ended; one group step then follows all 100 (read its record and progress, `trial.report`, the pruner),
   tells Optuna the ended one's result, asks for the next trial and launches it. Timed: the whole step, and the
   Optuna tell + ask alone (a decision: the figure the issue asks for, target < 1 s).
2. A sweep of 1,000 trials through the DynamoDB journal backend: each trial asked (4 parameters, TPE), 5
   intermediate values reported, told. Counted: items written (journal entries, plus one run record per member and
   the group item), reads while it ran, and the reads a cold Lambda makes to rebuild the study from the table.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_size import size  # noqa: E402

MEMBERS = size(100, 4)
TRIALS = size(1000, 20)
ROUNDS = 3


def _put(account, key: str, body: dict) -> None:
    account.s3.put_object(Bucket=account.bucket, Key=key, Body=json.dumps(body).encode())


def decisions() -> None:
    import optuna
    from moto import mock_aws

    from tests.supervisor.conftest import Account
    from training_infra.local.moto_server import teach_instance_profiles
    from training_infra.supervisor.runtime import sweeps
    from training_infra.supervisor.runtime.run_requests import handle_request

    teach_instance_profiles()
    with mock_aws():
        account = Account()
        account.cfg = dataclasses.replace(account.cfg, allowed_instance_types="g5.*")
        space = {"lr": {"type": "log-float", "low": 1e-5, "high": 1e-1}, "layers": {"type": "int", "low": 2, "high": 8},
                 "dropout": {"type": "float", "low": 0.0, "high": 0.5},
                 "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]}}  # fmt: skip
        sweep = {"template": {"instance_types": ["g5.xlarge"], "market": "spot", "max_runtime_hours": 12},
                 "space": space, "objective": {"metric": "val_loss"}, "trials": MEMBERS + ROUNDS + 1,
                 "parallel": MEMBERS, "max_cost_usd": 100_000}  # fmt: skip
        sup = account.supervisor()
        started = time.perf_counter()
        answer = handle_request(sup, {"action": "sweep", "group": "bench", "sweep": sweep})
        assert answer["ok"], answer
        store = sweeps.GroupStore(account.dynamodb, account.table)
        while len(store.get("bench").running) < MEMBERS:
            sweeps.GroupStep(sup).step("bench")
        ramp = time.perf_counter() - started
        steps, cpu, optuna_times = [], [], []
        original_ask, original_tell = optuna.Study.ask, optuna.Study.tell

        def timed(function):
            def wrapper(*args, **kwargs):
                began = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    optuna_times[-1] += time.perf_counter() - began

            return wrapper

        optuna.Study.ask, optuna.Study.tell = timed(original_ask), timed(original_tell)
        try:
            for round_ in range(ROUNDS):
                group = store.get("bench")
                for n, trial in enumerate(group.running):
                    attempt = account.run(trial.run_id).current.n
                    _put(account, f"runs/{trial.run_id}/attempts/{attempt}/progress.json",
                         {"step": 10 * (round_ + 1), "metrics": {"val_loss": 1.0 / (n + round_ + 1)}})  # fmt: skip
                ended = account.run(group.running[0].run_id)
                _put(
                    account,
                    f"runs/{ended.run_id}/attempts/{ended.current.n}/status.json",
                    {"outcome": "succeeded", "exit_code": 0, "progress": {"step": 99, "metrics": {"val_loss": 0.1}}},
                )
                account.end_instance(ended.current.instance_id)
                sup.reconcile(ended.run_id)  # the member's own run ends first, as in reconcile_all
                optuna_times.append(0.0)
                began, began_cpu = time.perf_counter(), time.process_time()
                result = sweeps.GroupStep(sup).step("bench")
                steps.append(time.perf_counter() - began)
                cpu.append(time.process_time() - began_cpu)
                assert result["told"] and result["launched"], result
        finally:
            optuna.Study.ask, optuna.Study.tell = original_ask, original_tell
        step = statistics.median(steps)
        print(f"sweep: {MEMBERS} members launched in {ramp:.1f} s ({sweeps.LAUNCHES_PER_STEP} launches per step, "
              "the one-minute schedule ramps a wide group over several minutes)")  # fmt: skip
        print(f"sweep: one group step over {MEMBERS} running members (follow all, tell 1, ask 1, launch 1): "
              f"{step:.3f} s median of {ROUNDS} ({statistics.median(cpu):.3f} s of CPU, moto's included; "
              "the wall time grows with the machine's load)")  # fmt: skip
        decision = statistics.median(optuna_times)
        print(f"sweep: time per decision (tell Optuna the ended trial, ask the next) in a group of {MEMBERS}: "
              f"{decision * 1000:.0f} ms median; target < 1 s: {'met' if decision < 1 else 'NOT met'} "
              f"({1 / decision:.1f}x inside); per member followed: {step / MEMBERS * 1000:.1f} ms")  # fmt: skip


def journal_counts() -> None:
    import optuna
    from moto import mock_aws

    from tests.supervisor.conftest import Account
    from training_infra.local.moto_server import teach_instance_profiles
    from training_infra.supervisor.runtime.journal import DynamoJournalBackend
    from training_infra.supervisor.runtime.sweeps import Group, SweepSpec, Trial, TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    teach_instance_profiles()
    with mock_aws():
        account = Account()
        backend = DynamoJournalBackend(account.dynamodb, account.table, "big")
        storage = optuna.storages.JournalStorage(backend)
        study = optuna.create_study(storage=storage, study_name="big", sampler=optuna.samplers.TPESampler(seed=1),
                                    pruner=optuna.pruners.MedianPruner())  # fmt: skip
        space = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
                 "layers": optuna.distributions.IntDistribution(2, 8),
                 "dropout": optuna.distributions.FloatDistribution(0.0, 0.5),
                 "optimizer": optuna.distributions.CategoricalDistribution(["adam", "sgd"])}  # fmt: skip
        started, started_cpu = time.perf_counter(), time.process_time()
        trials = []
        for n in range(TRIALS):
            trial = study.ask(space)
            for step in range(5):
                trial.report(1.0 / (n + step + 1), step)
            study.tell(trial, 1.0 / (n + 1))
            trials.append(Trial(number=n, run_id=f"big-t{n}", params=trial.params, state=TrialState.COMPLETE,
                                value=1.0 / (n + 1), step=4, attempts=1, cost_usd=1.2345,
                                message="val_loss 0.00123"))  # fmt: skip
        took, took_cpu = time.perf_counter() - started, time.process_time() - started_cpu
        entries, reads, items_read = backend.counts.puts, backend.counts.read_calls, backend.counts.items_read
        cold = DynamoJournalBackend(account.dynamodb, account.table, "big")
        began = time.perf_counter()
        rebuilt = optuna.load_study(study_name="big", storage=optuna.storages.JournalStorage(cold))
        assert len(rebuilt.trials) == TRIALS
        rebuild = time.perf_counter() - began
        spec = SweepSpec.from_dict({"template": {"instance_types": ["g5.xlarge"]}, "space": {
            "lr": {"type": "log-float", "low": 1e-5, "high": 1e-1}, "layers": {"type": "int", "low": 2, "high": 8},
            "dropout": {"type": "float", "low": 0.0, "high": 0.5},
            "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]}},
            "objective": {"metric": "val_loss"}, "trials": TRIALS, "parallel": 10, "max_cost_usd": 1000})  # fmt: skip
        group = Group(name="big", spec=spec, created_at="2026-12-04T00:00:00Z", trials=trials)
        item_bytes = _item_bytes(group.to_item())
    print(
        f"sweep: {TRIALS} trials (4 parameters, 5 intermediate values each) in {took:.1f} s ({took_cpu:.1f} s CPU) "
        "through the journal"
    )
    print(f"sweep: run table items: {entries} journal entries ({entries / TRIALS:.1f} per trial) + {TRIALS} member "
          f"run records + 1 group item = {entries + TRIALS + 1}")  # fmt: skip
    print(f"sweep: journal reads while it ran: {reads} calls ({reads / TRIALS:.1f} per trial; "
          f"{items_read} entries read back, each once)")  # fmt: skip
    print(
        f"sweep: a cold Lambda rebuilds the study in {cold.counts.read_calls} reads "
        f"({cold.counts.items_read} entries, BatchGetItem 100 a call) in {rebuild:.1f} s; warm: 1 GetItem per sync"
    )
    print(f"sweep: the group item with {TRIALS} trials: {item_bytes / 1024:.0f} KB of DynamoDB's 400 KB")


def _item_bytes(item: dict) -> int:
    """DynamoDB's item size, from above: attribute names plus their plain values as JSON (DynamoDB counts names and
    values, numbers at about half a byte a digit, and no type markers)."""
    from boto3.dynamodb.types import TypeDeserializer

    plain = {name: TypeDeserializer().deserialize(value) for name, value in item.items()}
    return sum(len(name) + len(json.dumps(value, default=str)) for name, value in plain.items())


def main() -> None:
    decisions()
    journal_counts()


if __name__ == "__main__":
    main()
