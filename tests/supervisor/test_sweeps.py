"""Sweeps (issue 26): a group of managed runs whose parameters real Optuna 5 chooses, its study kept in the run
table of the local AWS (moto), stepped by the supervisor's own reconcile.

What is played: the members' trainers. Each member is a real managed run (its launch template, fleet and instance in
moto), but its agent's output is put into the emulator's S3 by the test, as the agent writes it: the attempt's
progress.json with the heartbeat's `metrics` while it trains, status.json when it ends; an instance is terminated
to end an attempt. The supervisor's step is driven directly (`reconcile_all`, what the one-minute schedule calls).
"""

from __future__ import annotations

import base64
import dataclasses
import json

import optuna
import pytest
from botocore.exceptions import ClientError

from training_infra.supervisor.runtime import sweeps
from training_infra.supervisor.runtime.journal import DynamoJournalBackend
from training_infra.supervisor.runtime.records import MonthlyLedger, RunState
from training_infra.supervisor.runtime.run_requests import Launcher, Refused, handle_request
from training_infra.supervisor.runtime.supervisor import SPOT_WARNING, SupervisorConfig
from training_infra.supervisor.runtime.sweeps import GroupState, GroupStore, TrialState, check_request, group_key

from .conftest import event

TEMPLATE = {"instance_types": ["g5.xlarge"], "market": "spot", "max_runtime_hours": 2, "command": "python train.py"}
SWEEP = {
    "template": TEMPLATE,
    "space": {
        "lr": {"type": "log-float", "low": 1e-5, "high": 1e-1},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "layers": {"type": "int", "low": 2, "high": 8},
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    },
    "objective": {"metric": "val_loss", "direction": "minimize"},
    "trials": 6,
    "parallel": 2,
    "max_cost_usd": 100,
}
# The stack's limits, as the request function reads them from its environment.
LIMITS = SupervisorConfig(table="runs", outputs_bucket="outputs", allowed_instance_types="g5.*", max_runtime_hours=12)


def _sweep(account, name: str = "lr", **changes) -> dict:
    return handle_request(account.supervisor(), {"action": "sweep", "group": name, "sweep": {**SWEEP, **changes}})


def _group(account, name: str = "lr"):
    return GroupStore(account.dynamodb, account.table).get(name)


def _put(account, key: str, body: dict) -> None:
    account.s3.put_object(Bucket=account.bucket, Key=key, Body=json.dumps(body).encode())


def _beat(account, run_id: str, step: int, value: float) -> None:
    """The agent's progress.json for the run's open attempt: the trainer's last heartbeat with its metrics."""
    attempt = account.run(run_id).current.n
    _put(account, f"runs/{run_id}/attempts/{attempt}/progress.json",
         {"step": step, "steps_per_second": 1.0, "changed_at": "", "metrics": {"val_loss": value}})  # fmt: skip


def _end(account, run_id: str, outcome: str, value: float | None = None) -> None:
    """The attempt ends: the agent's status.json (with the last progress), then the instance goes away."""
    run = account.run(run_id)
    attempt = run.current
    progress = {"step": 100, "metrics": {"val_loss": value}} if value is not None else None
    _put(account, f"runs/{run_id}/attempts/{attempt.n}/status.json",
         {"run_id": run_id, "attempt": attempt.n, "outcome": outcome, "exit_code": 0 if outcome == "succeeded" else 1,
          "ended_at": "2026-11-29T09:00:00Z", "hourly_price_usd": 1.006, "message": f"trainer {outcome}",
          "progress": progress})  # fmt: skip
    account.end_instance(attempt.instance_id)


def _step(account) -> None:
    account.supervisor().reconcile_all()


def _study(account, name: str = "lr"):
    storage = optuna.storages.JournalStorage(DynamoJournalBackend(account.dynamodb, account.table, name))
    return optuna.load_study(study_name=name, storage=storage)


def test_a_sweep_of_six_trials_runs_two_at_a_time_tells_optuna_each_result_and_reports_the_best(account):
    answer = _sweep(account)
    assert answer["ok"] and answer["group"] == "lr" and len(answer["launched"]) == 2

    values = iter([0.9, 0.5, 0.7, 0.2, 0.8, 0.6])
    for _round in range(3):
        group = _group(account)
        running = [t for t in group.trials if t.state == TrialState.RUNNING]
        assert len(running) == 2, "two at once, never more"
        live = [i for r in account.ec2.describe_instances()["Reservations"] for i in r["Instances"]
                if i["State"]["Name"] == "running"]  # fmt: skip
        assert len(live) == 2
        for trial in running:
            member = account.run(trial.run_id)
            assert member.group == "lr" and member.trial == trial.number
            _end(account, trial.run_id, "succeeded", next(values))
        _step(account)

    group = _group(account)
    assert group.state == GroupState.COMPLETED and len(group.trials) == 6
    assert [t.state for t in group.trials] == [TrialState.COMPLETE] * 6
    assert group.best["value"] == 0.2 and group.best["number"] == 3
    study = _study(account)
    assert len(study.trials) == 6 and study.best_trial.number == 3 and study.best_value == 0.2
    assert group.best["params"] == study.best_trial.params
    assert all({"lr", "dropout", "layers", "optimizer"} == set(t.params) for t in group.trials)


def test_a_members_trainer_gets_each_parameter_as_an_env_variable_and_all_as_json(account):
    _sweep(account)
    trial = _group(account).trials[0]
    run = account.run(trial.run_id)
    data = account.ec2.describe_launch_template_versions(LaunchTemplateId=run.spec.launch_template_id)[
        "LaunchTemplateVersions"
    ][0]["LaunchTemplateData"]
    user_data = base64.b64decode(data["UserData"]).decode()
    assert f"TI_PARAM_LR={trial.params['lr']!r}" in user_data
    assert f"TI_PARAM_OPTIMIZER={trial.params['optimizer']}" in user_data
    assert f"TI_TRIAL={trial.number}" in user_data and "TI_GROUP=lr" in user_data
    assert json.dumps(trial.params, sort_keys=True, separators=(",", ":")) in user_data


def test_a_member_reclaimed_mid_trial_relaunches_as_the_same_trial_and_is_never_asked_again(account):
    _sweep(account)
    first = _group(account).trials[0]
    run = account.run(first.run_id)
    _beat(account, first.run_id, 10, 0.8)
    _step(account)
    account.supervisor().handle(event(SPOT_WARNING, run.current.instance_id))
    account.end_instance(run.current.instance_id)  # AWS takes it back: no status.json

    _step(account)

    group = _group(account)
    again = account.run(first.run_id)
    assert again.active and len(again.launched) == 2 and again.attempts[0].end_reason == "reclaimed"
    # The same run: the same launch template (TI_RUN_ID), so the agent restores checkpoints/<id>/.
    assert again.spec.launch_template_id == run.spec.launch_template_id
    assert [t.number for t in group.trials] == [0, 1], "no new trial asked for the reclaimed one"
    assert group.trials[0].state == TrialState.RUNNING and group.trials[0].attempts == 2
    assert group.trials[0].params == first.params
    assert len(_study(account).trials) == 2
    _beat(account, first.run_id, 20, 0.4)  # attempt 2 goes on reporting to the same trial
    _step(account)
    assert _study(account).trials[0].intermediate_values == {10: 0.8, 20: 0.4}


def test_a_member_the_median_pruner_stops_ends_gracefully_as_pruned_and_a_new_trial_takes_its_slot(account):
    _sweep(account, pruning={"kind": "median", "startup_trials": 2, "warmup_steps": 0})
    for trial, value in zip(_group(account).trials, (0.3, 0.4), strict=True):
        _beat(account, trial.run_id, 10, value)
    _step(account)
    for trial, value in zip(_group(account).trials, (0.25, 0.35), strict=True):
        _end(account, trial.run_id, "succeeded", value)
    _step(account)
    bad = next(t for t in _group(account).trials if t.state == TrialState.RUNNING)

    _beat(account, bad.run_id, 10, 5.0)  # far worse than the median of the completed trials at step 10
    _step(account)

    member = account.run(bad.run_id)
    assert member.state == RunState.STOPPING and member.stop_reason == "pruned"
    assert next(t for t in _group(account).trials if t.number == bad.number).state == TrialState.PRUNING
    _end(account, bad.run_id, "stopped")
    _step(account)
    group = _group(account)
    trial = next(t for t in group.trials if t.number == bad.number)
    assert trial.state == TrialState.PRUNED and account.run(bad.run_id).state == RunState.STOPPED
    assert _study(account).trials[bad.number].state == optuna.trial.TrialState.PRUNED
    assert len(group.running) == 2, "the pruned member's slot went to a new trial"


def test_a_member_that_fails_after_its_own_restarts_is_a_failed_trial(account):
    _sweep(account, template={**TEMPLATE, "max_restarts_on_errors": 1})
    trial = _group(account).trials[0]
    _end(account, trial.run_id, "failed")
    _step(account)
    assert account.run(trial.run_id).active, "its one restart first"
    assert _group(account).trials[0].state == TrialState.RUNNING
    _end(account, trial.run_id, "failed")
    _step(account)

    assert account.run(trial.run_id).state == RunState.FAILED
    assert _group(account).trials[0].state == TrialState.FAILED
    assert _study(account).trials[0].state == optuna.trial.TrialState.FAIL


def test_the_groups_dollar_limit_stops_its_members_gracefully_and_ends_the_group(account):
    account.cfg = dataclasses.replace(account.cfg, monthly_limit_usd=500)
    month = MonthlyLedger.key(account.clock())
    assert _sweep(account, max_cost_usd=8, template={**TEMPLATE, "market": "on-demand", "max_runtime_hours": 6})["ok"]
    assert account.supervisor().month_ledger().read(month)["reservations"] == {group_key("lr"): 8}
    members = [t.run_id for t in _group(account).trials]
    account.clock.advance(hours=3)  # two g5.xlarge ($1.006/hour each) for 3 hours: about $6.10 of the $8
    _step(account)
    assert _group(account).state == GroupState.RUNNING

    account.clock.advance(hours=0.8)  # $7.73 spent, and a graceful stop of both ($0.34) would pass $8
    _step(account)

    group = _group(account)
    assert group.state == GroupState.STOPPING and group.stop_reason == "budget"
    assert all(account.run(m).state == RunState.STOPPING for m in members)
    for m in members:
        _end(account, m, "stopped")
    _step(account)
    group = _group(account)
    assert group.state == GroupState.BUDGET and len(group.trials) == 2, "no trial started past the limit"
    assert all(t.state == TrialState.STOPPED for t in group.trials)
    ledger = account.supervisor().month_ledger().read(month)
    assert ledger["reservations"] == {} and 0 < ledger["spent_usd"] <= 8
    assert ledger["spent_usd"] == pytest.approx(group.spent_usd)


def test_sweep_stop_ends_every_member_gracefully_and_the_group_as_stopped(account):
    _sweep(account)
    answer = handle_request(account.supervisor(), {"action": "sweep_stop", "group": "lr"})
    assert answer["ok"] and len(answer["running"]) == 2
    members = [t.run_id for t in _group(account).trials]
    assert all(account.run(m).state == RunState.STOPPING for m in members)
    for m in members:
        _end(account, m, "stopped")
    _step(account)
    group = _group(account)
    assert group.state == GroupState.STOPPED and len(group.trials) == 2


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"trails": 6}, "trails: unknown key; allowed: "),
        ({"trials": 0}, "trials: got 0; allowed: a whole number from 1 to 1000"),
        ({"parallel": 1000}, "parallel: got 1000; allowed: a whole number from 1 to 100"),
        ({"max_cost_usd": None}, "max_cost_usd: got None; allowed: the group's dollar limit"),
        ({"space": {"lr": {"type": "log-float", "low": 0, "high": 1}}}, "space.lr.low: got 0; allowed: more than 0"),
        ({"space": {"lr": {"type": "uniform", "low": 0, "high": 1}}}, "space.lr.type: got 'uniform'; allowed: float"),
        ({"space": {"n": {"type": "int", "low": 5, "high": 1}}}, "space.n.high: got 1; allowed: more than low (5)"),
        ({"space": {"o": {"type": "categorical", "choices": []}}}, "space.o.choices: got []; allowed: 1 to 100"),
        ({"objective": {"metric": "val_loss", "direction": "down"}}, "objective.direction: got 'down'; allowed: "),
        ({"pruning": {"kind": "hyperband"}}, "pruning.kind: got 'hyperband'; allowed: median"),
        (
            {"objective": {"metric": "val_loss", "directon": "max"}},
            "objective.directon: unknown key; allowed: direction, metric (did you mean direction?)",
        ),
        (
            {"pruning": {"kind": "median", "warmup_step": 3}},
            "pruning.warmup_step: unknown key; allowed: kind, startup_trials, warmup_steps "
            "(did you mean warmup_steps?)",
        ),
        (
            {"space": {"lr": {"type": "float", "low": 0, "hgh": 1}}},
            "space.lr.hgh: got 1; allowed: only type, low and high (did you mean high?)",
        ),
        ({"template": {**TEMPLATE, "instance_types": ["p5.48xlarge"]}}, "template.instance_types: got p5.48xlarge"),
        ({"template": {**TEMPLATE, "market": "cheap"}}, "template: option '--market': got 'cheap'; allowed: spot"),
        ({"template": {**TEMPLATE, "env": ["TI_PARAM_LR=1"]}}, "template.env: got TI_PARAM*"),
        (
            {"template": {k: v for k, v in TEMPLATE.items() if k != "instance_types"}},
            "template.instance_types: got None; allowed: one or more instance types",
        ),
        ({"template": {**TEMPLATE, "nodes": 2}}, "template.nodes: got 2; allowed: 1 (multi-node sweeps are not"),
        (
            {"trials": 1000, "space": {f"p{i}": {"type": "float", "low": 0, "high": 1} for i in range(32)}},
            "trials: got 1000; allowed: at most 332 for this space",
        ),
    ],
)
def test_a_sweep_with_a_mistake_is_refused_in_one_line(changes, line):
    _spec, problems = check_request(LIMITS, {"group": "lr", "sweep": {**SWEEP, **changes}})
    assert any(got.startswith(line) for got in problems), problems
    assert all("\n" not in got for got in problems)


def test_every_mistake_of_a_sweep_is_reported_at_once_with_a_did_you_mean():
    _spec, lines = check_request(LIMITS, {"group": "lr", "sweep": {**SWEEP, "trails": 6, "parallel": 0,
                                                                    "objective": {"metric": ""}}})  # fmt: skip
    assert "trails: unknown key; allowed: max_cost_usd, objective, parallel, pruning, seed, space, template, " \
           "trials (did you mean trials?)" in lines  # fmt: skip
    assert any(x.startswith("parallel: got 0") for x in lines) and any(x.startswith("objective.metric") for x in lines)


def test_a_refused_sweep_request_answers_every_line_and_creates_no_group_study_or_reservation(account):
    account.cfg = dataclasses.replace(account.cfg, monthly_limit_usd=500)
    answer = _sweep(account, trials=0, parallel=0)
    assert answer["ok"] is False and answer["usage"] is True and len(answer["error"].splitlines()) == 2
    assert _group(account) is None
    assert account.supervisor().month_ledger().read(MonthlyLedger.key(account.clock()))["reservations"] == {}
    assert list(DynamoJournalBackend(account.dynamodb, account.table, "lr").read_logs(0)) == []


def test_two_journal_writers_at_once_never_overwrite_each_others_entries(account):
    first = DynamoJournalBackend(account.dynamodb, account.table, "race")
    second = DynamoJournalBackend(account.dynamodb, account.table, "race")
    first.append_logs([{"op": "a"}])
    second.append_logs([{"op": "b"}])  # it believes entry 0 is free: conflicts, then takes 1
    first.append_logs([{"op": "c"}])

    assert [e["op"] for e in first.read_logs(0)] == ["a", "b", "c"]
    assert [e["op"] for e in second.read_logs(1)] == ["b", "c"]
    assert second.counts.conflicts == 1 and first.counts.conflicts == 1


def test_a_run_of_a_members_name_launched_outside_the_sweep_is_never_taken_over_and_its_trial_fails(account):
    account.new_run("lr-t0")  # someone's own run, named as trial 0 of group lr would be

    _sweep(account)

    group = _group(account)
    first = next(t for t in group.trials if t.number == 0)
    assert first.state == TrialState.FAILED
    assert first.message.startswith("run lr-t0 already exists and is not this trial's (no group)")
    squatter = account.run("lr-t0")
    assert squatter.group == "" and squatter.trial is None, "the other run's record is left as it was"
    assert _study(account).trials[0].state == optuna.trial.TrialState.FAIL
    assert group.state == GroupState.RUNNING and len(group.running) == 2, "the next trials took the slots"
    assert all(account.run(t.run_id).group == "lr" for t in group.running)


def _failing_launches(monkeypatch, error: Exception, times: int) -> list[str]:
    """The members' launches fail `times` times with `error` (throttling is an answer moto never gives), then
    go through to the real Launcher; the run ids it was asked for are returned."""
    asked: list[str] = []
    real = Launcher.launch

    def launch(self, request):
        asked.append(request.run_id)
        if len(asked) <= times:
            raise error
        return real(self, request)

    monkeypatch.setattr(sweeps.Launcher, "launch", launch)
    return asked


def test_a_members_launch_throttled_by_aws_leaves_the_group_running_and_the_next_step_launches_the_same_trial(
    account, monkeypatch
):
    throttled = ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "CreateFleet")
    asked = _failing_launches(monkeypatch, throttled, times=1)

    answer = _sweep(account)

    assert answer["ok"] and answer["state"] == GroupState.RUNNING and answer["launched"] == []
    group = _group(account)
    assert group.state == GroupState.RUNNING and group.trials == []
    assert "not launched yet (the next step retries)" in group.message
    params = _study(account).trials[0].params
    _step(account)
    group = _group(account)
    assert asked[:2] == ["lr-t0", "lr-t0"], "the same trial again, never a new one asked in its place"
    assert [t.number for t in group.trials] == [0, 1] and group.trials[0].params == params
    assert account.run("lr-t0").group == "lr" and group.trials[0].state == TrialState.RUNNING


def test_a_members_launch_refused_by_the_stacks_limits_fails_that_trial_but_not_the_group(account, monkeypatch):
    _failing_launches(monkeypatch, Refused("no spot capacity for g5.xlarge in any zone"), times=1)

    answer = _sweep(account)

    assert answer["state"] == GroupState.RUNNING
    group = _group(account)
    assert group.trials[0].state == TrialState.FAILED and "no spot capacity" in group.trials[0].message
    assert len(group.running) == 2


def test_a_members_launch_refused_as_a_usage_error_stops_the_group_with_the_reason(account, monkeypatch):
    _failing_launches(monkeypatch, Refused("option '--image': got 'nope'; allowed: an image", usage=True), times=1)

    answer = _sweep(account)

    assert answer["state"] == GroupState.STOPPED and "trial 0 not launched: option '--image'" in answer["message"]
    assert len(_group(account).trials) == 1


def test_three_trials_failed_in_a_row_end_the_group_with_that_reason_and_ask_no_more(account):
    _sweep(account)
    for trial in _group(account).trials:  # trials 0 and 1
        _end(account, trial.run_id, "failed")
    _step(account)
    group = _group(account)
    assert group.state == GroupState.RUNNING and group.failures_in_row == 2 and len(group.trials) == 4
    _end(account, group.trials[2].run_id, "failed")

    _step(account)

    group = _group(account)
    assert group.state == GroupState.STOPPING and group.stop_reason == "failures" and len(group.trials) == 4
    assert group.message.startswith("3 trials failed in a row, none succeeded between (the last, trial 2: failed")
    assert account.run(group.trials[3].run_id).state == RunState.STOPPING
    _end(account, group.trials[3].run_id, "stopped")
    _step(account)
    group = _group(account)
    assert group.state == GroupState.STOPPED and group.message.startswith("stopped: 3 trials failed in a row")
    assert len(_study(account).trials) == 4, "no trial asked after the third failure"


def test_a_completed_trial_between_failures_resets_the_count(account):
    _sweep(account)
    first, second = _group(account).trials
    _end(account, first.run_id, "failed")
    _end(account, second.run_id, "succeeded", 0.5)
    _step(account)
    assert _group(account).failures_in_row == 0


def test_a_members_record_keeps_its_spec_with_the_trials_parameters_so_launch_like_reruns_the_trial(account):
    from training_infra.spec import read_yaml, validate

    _sweep(account, template={**TEMPLATE, "env": ["EPOCHS=3"], "stall_seconds": 1200})
    trial = _group(account).trials[0]

    record = account.run(trial.run_id)
    data = validate(read_yaml(record.spec_yaml, source="member")[0], source="member").to_data()  # as --like reads it
    assert data["resources"]["instance_types"] == ["g5.xlarge"] and data["resources"]["market"] == "spot"
    assert data["command"] == "python train.py" and data["limits"]["max_runtime_hours"] == 2
    assert data["limits"]["stall_minutes"] == 20
    assert data["env"]["EPOCHS"] == "3" and data["env"]["TI_PARAM_LR"] == repr(trial.params["lr"])
    assert json.loads(data["env"]["TI_PARAMS"]) == trial.params and data["env"]["TI_TRIAL"] == "0"
