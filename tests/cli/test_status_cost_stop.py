"""`status`, `cost` and `stop` on runs with known times and prices."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from training_infra import naming, pricing
from training_infra.cli import runs
from training_infra.supervisor.runtime import ledger

COST_REGION = "eu-west-1"  # this module's own region: `cost` and `status` list every run in it
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
# The run template's 150 GB gp3 root volume bills beside the instance (conftest.stack_templates).
VOLUME_USD_PER_HOUR = ledger.volume_usd_per_hour(150)


def _pin_clock(monkeypatch, moment: datetime) -> None:
    """moto stamps LaunchTime with the real clock; uptimes are measured against this instead."""
    monkeypatch.setattr(runs, "utcnow", lambda: moment)


def _moto_spot_price(deployment, instance_type: str, zone: str) -> float:
    history = deployment.client("ec2").describe_spot_price_history(InstanceTypes=[instance_type])["SpotPriceHistory"]
    return float(next(h["SpotPrice"] for h in history if h["AvailabilityZone"] == zone))


def _launch(stacks, run_id: str, *args: str) -> dict:
    result = stacks.cli("launch", "--run-id", run_id, *args)
    assert result.exit_code == 0, result.output
    [instance] = stacks.run_instances(run_id)
    return instance


def _legacy_instance(stacks, run_id: str, *, market: str = "on-demand") -> dict:
    """An instance as `launch` made them before managed runs (tags, no run record): still shown and stopped."""
    tags = {
        **naming.run_tags(run_id, max_runtime_hours=12, deadline="2030-01-01T00:00:00Z"),
        "Name": naming.instance_name(run_id),
    }
    extra = {"InstanceMarketOptions": {"MarketType": "spot"}} if market == "spot" else {}
    [stack_template] = stacks.client("ec2").describe_launch_template_versions(
        LaunchTemplateId=stacks.outputs[naming.OUTPUT_LAUNCH_TEMPLATE_ID], Versions=["$Default"]
    )["LaunchTemplateVersions"]
    # Launched from the stack's template, so with the project's instance profile (all the supervisor ends).
    extra["IamInstanceProfile"] = stack_template["LaunchTemplateData"]["IamInstanceProfile"]
    return stacks.client("ec2").run_instances(
        ImageId="ami-0123456789abcdef0", InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
        **extra,
    )["Instances"][0]  # fmt: skip


def _status_json(stacks, run_id: str) -> dict:
    result = stacks.cli("status", run_id, "--json")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    return row


def _finished(
    run_id: str,
    *,
    start: str,
    end: str,
    market: str,
    instance_type: str,
    zone: str,
    outcome: str = "succeeded",
    exit_code: int = 0,
) -> dict:
    return {
        "run_id": run_id, "outcome": outcome, "exit_code": exit_code, "started_at": start, "ended_at": end,
        "instance_id": f"i-{abs(hash(run_id)) % 16**17:017x}", "instance_type": instance_type, "market": market,
        "availability_zone": zone, "hourly_price_usd": pricing.on_demand_price(instance_type),
        "estimated_cost_usd": 0, "image": "repo:latest", "message": "done",
    }  # fmt: skip


# ---- status -------------------------------------------------------------------------------


def test_status_of_a_running_on_demand_run_shows_uptime_deadline_and_list_price_cost(stacks, monkeypatch):
    instance = _launch(stacks, "status-live", "--on-demand", "--max-runtime-hours", "4")
    _pin_clock(monkeypatch, instance["LaunchTime"] + timedelta(minutes=90))

    row = _status_json(stacks, "status-live")
    assert row["state"] == "running"
    assert row["market"] == "on-demand"
    assert row["instance_id"] == instance["InstanceId"]
    assert row["uptime_seconds"] == 5400
    assert row["cost_usd"] == pytest.approx(1.5 * (pricing.on_demand_price("g5.xlarge") + VOLUME_USD_PER_HOUR))
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert row["deadline"] == tags[naming.TAG_DEADLINE]

    assert [a["attempt"] for a in row["attempts"]] == [1] and row["tries"] == 1
    table = stacks.cli("status", "status-live").stdout
    assert "run status-live: running" in table and f"deadline {tags[naming.TAG_DEADLINE]}" in table
    line = next(line for line in table.splitlines() if instance["InstanceId"] in line)
    for cell in ("g5.xlarge", "on-demand", "running", "1h 30m", "$1.53"):
        assert cell in line, "the attempt's row"


def test_status_of_a_running_spot_run_prices_it_from_the_spot_price_history(stacks, monkeypatch):
    instance = _launch(stacks, "status-spot")
    _pin_clock(monkeypatch, instance["LaunchTime"] + timedelta(hours=2))

    row = _status_json(stacks, "status-spot")
    assert row["market"] == "spot"
    assert row["price_source"] == "spot history"
    zone = instance["Placement"]["AvailabilityZone"]
    assert row["cost_usd"] == pytest.approx(2 * (_moto_spot_price(stacks, "g5.xlarge", zone) + VOLUME_USD_PER_HOUR))
    assert row["on_demand_usd"] == pytest.approx(2 * pricing.on_demand_price("g5.xlarge"))


def test_status_of_a_finished_run_shows_its_outcome_from_status_json(stacks):
    stacks.put_status(
        _finished("status-done", start="2026-11-20T08:00:00Z", end="2026-11-20T11:00:00Z", market="on-demand",
                  instance_type="g4dn.xlarge", zone="us-east-1a", outcome="failed", exit_code=3)
    )  # fmt: skip

    row = _status_json(stacks, "status-done")
    assert (row["state"], row["outcome"], row["exit_code"]) == ("finished", "failed", 3)
    assert row["uptime_seconds"] == 3 * 3600
    assert row["cost_usd"] == pytest.approx(3 * pricing.on_demand_price("g4dn.xlarge"))
    line = next(line for line in stacks.cli("status", "status-done").stdout.splitlines() if "status-done" in line)
    for cell in ("finished", "3h 00m", "$1.58", "failed (exit 3)"):
        assert cell in line
    wide = next(
        line for line in stacks.cli("status", "status-done", "-o", "wide").stdout.splitlines() if "status-done" in line
    )
    assert "g4dn.xlarge" in wide and "on-demand" in wide


def test_status_joins_an_ended_legacy_instance_with_its_status_json(stacks):
    instance = _legacy_instance(stacks, "status-joined")
    stacks.client("ec2").terminate_instances(InstanceIds=[instance["InstanceId"]])
    stacks.put_status(
        _finished("status-joined", start="2026-11-21T08:00:00Z", end="2026-11-21T09:00:00Z", market="on-demand",
                  instance_type="g5.xlarge", zone="us-east-1a") | {"instance_id": instance["InstanceId"]}
    )  # fmt: skip

    result = stacks.cli("status", "status-joined", "--json")
    [row] = json.loads(result.stdout)
    assert row["instance_id"] == instance["InstanceId"]
    assert row["state"] == "terminated"
    assert row["outcome"] == "succeeded"


def test_status_of_an_unknown_run_says_so(stacks):
    result = stacks.cli("status", "never-launched")

    assert result.exit_code == 1
    assert "unknown run 'never-launched'" in result.stderr
    assert result.stderr.count("\n") == 1


# ---- cost ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cost_region(deployed):
    """Three finished runs with known times in a region of their own."""
    deployment = deployed(COST_REGION)
    deployment.put_status(
        _finished(
            "cost-spot",
            start="2026-11-27T10:00:00Z",
            end="2026-11-27T12:00:00Z",
            market="spot",
            instance_type="g5.xlarge",
            zone=f"{COST_REGION}a",
        )
    )
    deployment.put_status(
        _finished(
            "cost-od",
            start="2026-11-26T08:00:00Z",
            end="2026-11-26T09:30:00Z",
            market="on-demand",
            instance_type="g4dn.xlarge",
            zone=f"{COST_REGION}b",
        )
    )
    deployment.put_status(
        _finished(
            "cost-old",
            start="2026-10-01T08:00:00Z",
            end="2026-10-01T09:00:00Z",
            market="on-demand",
            instance_type="g5.xlarge",
            zone=f"{COST_REGION}a",
        )
    )
    return deployment


def test_cost_totals_runs_of_the_last_n_days_and_the_saving_against_on_demand(cost_region, monkeypatch):
    _pin_clock(monkeypatch, NOW)
    spot_rate = _moto_spot_price(cost_region, "g5.xlarge", f"{COST_REGION}a")

    result = cost_region.cli("cost", "--days", "30", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_run = {row["run_id"]: row for row in report["runs"]}
    assert set(by_run) == {"cost-spot", "cost-od"}, "the 58-day-old run is outside --days 30"
    assert by_run["cost-spot"]["cost_usd"] == pytest.approx(2 * spot_rate)
    assert by_run["cost-od"]["cost_usd"] == pytest.approx(1.5 * 0.526)
    expected_total = 2 * spot_rate + 1.5 * 0.526
    expected_on_demand = 2 * 1.006 + 1.5 * 0.526
    assert report["total_usd"] == pytest.approx(expected_total)
    assert report["on_demand_usd"] == pytest.approx(expected_on_demand)
    assert report["saving_usd"] == pytest.approx(expected_on_demand - expected_total)


def test_cost_table_shows_each_run_the_total_and_the_saving(cost_region, monkeypatch):
    _pin_clock(monkeypatch, NOW)

    result = cost_region.cli("cost", "--days", "90")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    row = {name: next(line for line in lines if name in line) for name in ("cost-spot", "cost-od", "cost-old", "total")}
    for cell in ("g5.xlarge", "spot", "2.00", "$2.01", "spot history"):
        assert cell in row["cost-spot"]
    for cell in ("g4dn.xlarge", "on-demand", "1.50", "$0.79", "on-demand list"):
        assert cell in row["cost-od"]
    assert "$1.01" in row["cost-old"]
    assert "$1.80" in row["total"] and "$3.81" in row["total"]
    assert "saving vs on-demand: $2.01 (53%)" in result.stdout


def test_status_lists_every_run_in_the_region_newest_first(cost_region):
    result = cost_region.cli("status", "--json")

    assert [row["run_id"] for row in json.loads(result.stdout)] == ["cost-spot", "cost-od", "cost-old"]


def test_cost_with_no_runs_in_the_window_says_so(cost_region, monkeypatch):
    _pin_clock(monkeypatch, datetime(2027, 6, 1, tzinfo=UTC))

    result = cost_region.cli("cost", "--days", "7")

    assert result.exit_code == 0
    assert "no runs in the last 7 days" in result.stdout


# ---- stop ---------------------------------------------------------------------------------


def test_stop_asks_a_managed_run_to_end_gracefully_and_never_relaunch(stacks):
    instance = _launch(stacks, "stop-me")

    result = stacks.cli("stop", "stop-me")

    assert result.exit_code == 0, result.output
    assert f"stopping run stop-me on {instance['InstanceId']}: no more attempts" in result.stdout
    tags = {t["Key"]: t["Value"] for t in stacks.instance(instance["InstanceId"])["Tags"]}
    assert tags[naming.TAG_STOP] == "user", "the agent sees the stop through IMDS tags and stops the trainer gracefully"
    assert stacks.instance(instance["InstanceId"])["State"]["Name"] == "running", "terminated only after the grace"
    row = _status_json(stacks, "stop-me")
    assert row["state"] == "stopping" and row["managed"]["stop_requested_at"]
    again = stacks.cli("stop", "stop-me")
    assert again.exit_code == 0 and "already stopping" in again.stdout


def test_stop_terminates_a_legacy_runs_instance(stacks):
    instance = _legacy_instance(stacks, "stop-legacy")

    result = stacks.cli("stop", "stop-legacy")

    assert result.exit_code == 0, result.output
    assert stacks.instance(instance["InstanceId"])["State"]["Name"] in ("shutting-down", "terminated")
    assert f"terminating {instance['InstanceId']}" in result.stdout
    again = stacks.cli("stop", "stop-legacy")
    assert again.exit_code == 0
    assert "already ended" in again.stdout


def test_stop_refuses_an_instance_that_is_not_tagged_managed(stacks):
    ec2 = stacks.client("ec2")
    instance = ec2.run_instances(
        ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": naming.TAG_RUN_ID, "Value": "not-ours"}]}],
    )["Instances"][0]  # fmt: skip

    result = stacks.cli("stop", "not-ours")

    assert result.exit_code == 1
    assert f"refusing to terminate {instance['InstanceId']}" in result.stderr
    assert stacks.instance(instance["InstanceId"])["State"]["Name"] == "running"


def test_stop_an_unknown_run_says_so(stacks):
    result = stacks.cli("stop", "no-such-run")

    assert result.exit_code == 1
    assert "unknown run 'no-such-run'" in result.stderr


def test_an_instance_ended_on_the_local_aws_has_a_cost_although_its_reason_says_utc(stacks):
    """AWS writes "User initiated (2026-11-28 10:00:00 GMT)", moto "... UTC": both are the end of the bill."""
    instance = _legacy_instance(stacks, "status-utc-reason")
    stacks.client("ec2").terminate_instances(InstanceIds=[instance["InstanceId"]])
    assert stacks.instance(instance["InstanceId"])["StateTransitionReason"].endswith(" UTC)")

    row = _status_json(stacks, "status-utc-reason")

    assert row["state"] == "terminated"
    assert row["price_source"] == "on-demand list"
    assert row["cost_usd"] is not None and row["uptime_seconds"] is not None


@pytest.mark.parametrize("zone_name", ["GMT", "UTC"])
def test_the_end_of_an_instance_is_read_from_either_spelling_of_the_reason(zone_name):
    ended = runs.run_from_instance({
        "InstanceId": "i-0123456789abcdef0", "State": {"Name": "terminated"},
        "StateTransitionReason": f"User initiated (2026-11-28 10:00:00 {zone_name})",
    })  # fmt: skip
    assert ended.ended_at == datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def test_stop_terminates_a_legacy_runs_stopped_instance_whose_volume_still_bills(stacks):
    instance = _legacy_instance(stacks, "stopped-legacy")
    ec2 = stacks.client("ec2")
    ec2.stop_instances(InstanceIds=[instance["InstanceId"]])  # auto_shutdown=false then a manual stop
    assert stacks.instance(instance["InstanceId"])["State"]["Name"] == "stopped"

    result = stacks.cli("stop", "stopped-legacy")

    assert result.exit_code == 0, result.output
    assert f"terminating stopped {instance['InstanceId']}" in result.stdout
    assert stacks.instance(instance["InstanceId"])["State"]["Name"] in ("shutting-down", "terminated")
