"""`status` and `cost` cost what they show: the run table answers, S3 and EC2 only for what is shown.

Each test counts the AWS calls the command makes (botocore's `before-call` event on every client
the CLI creates), in a region of this module's own so the run counts are exact.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError

from training_infra import naming, pricing
from training_infra.cli import runs
from training_infra.cli.aws import Aws
from training_infra.supervisor.runtime import ledger
from training_infra.supervisor.runtime.records import Attempt, Run, RunSpec, RunState, RunStore, iso

REGION = "eu-central-1"  # this module's own (ap-southeast-2 stays empty for the not-deployed tests)
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
G5 = pricing.on_demand_price("g5.xlarge")
# Where a recorded run ran: ids of the shape the supervisor records (these runs are only read back).
WHERE = {"subnet_ids": ("subnet-0123456789abcdef0",), "launch_template_id": "lt-0123456789abcdef0",
         "max_runtime_hours": 12}  # fmt: skip


@pytest.fixture(scope="module")
def region(deployed):
    return deployed(REGION)


class Calls(Counter):
    """Every AWS operation the CLI calls, counted as `service.Operation`, with each call's parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.params: list[tuple[str, dict]] = []
        self.refuse: set[str] = set()  # operations answered with AccessDeniedException, as IAM would

    def clear(self) -> None:
        super().clear()
        self.params.clear()


@pytest.fixture
def calls(monkeypatch) -> Calls:
    counted = Calls()
    original = Aws.client

    def seen(service: str, model, params, **_) -> None:  # the call's API parameters, before serializing
        name = f"{service}.{model.name}"
        counted.update([name])
        counted.params.append((name, dict(params)))
        if name in counted.refuse:
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "denied"}}, model.name)

    def counting(self, service):
        client = original(self, service)
        if not getattr(client, "_counted", False):
            client.meta.events.register("before-parameter-build", functools.partial(seen, service))
            client._counted = True
        return client

    monkeypatch.setattr(Aws, "client", counting)
    monkeypatch.setattr(runs, "utcnow", lambda: NOW)
    return counted


def _store(region) -> RunStore:
    return RunStore(region.client("dynamodb"), region.outputs[naming.OUTPUT_RUN_TABLE])


def _attempt(n: int, start: datetime, hours: float | None, *, market="on-demand", zone="eu-central-1a", **extra):
    ended = iso(start + timedelta(hours=hours)) if hours is not None else ""
    return Attempt(n=n, instance_id=f"i-{n:017x}", instance_type="g5.xlarge", zone=zone, market=market,
                   started_at=iso(start), ended_at=ended, **extra)  # fmt: skip


def _record(run_id: str, created: datetime, attempts: list[Attempt], state: str = "succeeded") -> Run:
    spec = RunSpec(market="on-demand", instance_types=("g5.xlarge",), list_prices={"g5.xlarge": G5}, **WHERE)
    for attempt in attempts:
        if attempt.ended_at and not attempt.priced:
            ledger.record_price(attempt, ledger.price_attempt(attempt, spec, NOW, None))
    return Run(run_id=run_id, spec=spec, deadline_at=iso(created + timedelta(hours=12)), created_at=iso(created),
               state=RunState(state), attempts=attempts, ended_at=attempts[-1].ended_at)  # fmt: skip


def _legacy_status(run_id: str, start: datetime, hours: float) -> dict:
    return {"run_id": run_id, "outcome": "succeeded", "exit_code": 0, "started_at": iso(start),
            "ended_at": iso(start + timedelta(hours=hours)), "instance_id": "i-0123456789abcdef0",
            "instance_type": "g5.xlarge", "market": "on-demand", "availability_zone": "eu-central-1a",
            "hourly_price_usd": G5, "estimated_cost_usd": G5 * hours, "message": "done"}  # fmt: skip


def _status_rows(region, *args: str) -> list[dict]:
    result = region.cli("status", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_status_reads_each_older_runs_status_json_once_then_only_the_run_table(region, calls):
    region.put_status(_legacy_status("scale-legacy-1", NOW - timedelta(days=40), 2))
    region.put_status(_legacy_status("scale-legacy-2", NOW - timedelta(days=39), 1))

    first = _status_rows(region)
    assert {"scale-legacy-1", "scale-legacy-2"} <= {row["run_id"] for row in first}
    assert calls["s3.GetObject"] >= 2, "the first look reads the status files it has not seen"
    calls.clear()

    second = _status_rows(region)

    assert [row["run_id"] for row in second] == [row["run_id"] for row in first]
    assert calls["s3.GetObject"] == 0, "a status file already recorded is never read again"
    assert calls["dynamodb.Query"] == 1, "one query for the newest runs"
    assert calls["s3.ListObjectsV2"] == 1, "one listing of runs/ finds runs made outside the table"
    assert calls["ec2.DescribeSpotPriceHistory"] == 0, "finished attempts carry their price"
    legacy = next(row for row in second if row["run_id"] == "scale-legacy-1")
    assert legacy["outcome"] == "succeeded" and legacy["cost_usd"] == pytest.approx(2 * G5)


def _live_legacy_instance(region, run_id: str) -> str:
    tags = naming.run_tags(run_id, max_runtime_hours=12)
    return region.client("ec2").run_instances(
        ImageId="ami-0123456789abcdef0", InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )["Instances"][0]["InstanceId"]  # fmt: skip


def test_a_running_run_without_a_record_is_shown_from_ec2_and_recorded_once_its_status_json_lands(region, calls):
    """The stack's own instance (or an older CLI's launch): logs under runs/ while it runs, status.json at its end."""
    instance_id = _live_legacy_instance(region, "scale-late")
    region.client("s3").put_object(Bucket=region.outputs_bucket, Key="runs/scale-late/logs/training.log", Body=b"x")

    running = {row["run_id"]: row for row in _status_rows(region)}
    assert running["scale-late"]["instance_id"] == instance_id and running["scale-late"]["state"] == "running"
    region.client("ec2").terminate_instances(InstanceIds=[instance_id])
    region.put_status(_legacy_status("scale-late", NOW - timedelta(days=2), 1))

    ended = {row["run_id"]: row for row in _status_rows(region)}

    assert ended["scale-late"]["outcome"] == "succeeded" and ended["scale-late"]["cost_usd"] == pytest.approx(G5)


def test_a_folder_that_never_got_a_status_json_is_read_once_not_at_every_call(region, calls):
    """A run killed before it wrote one (no instance left): looked at once, then accounted for."""
    region.client("s3").put_object(Bucket=region.outputs_bucket, Key="runs/scale-dead/logs/training.log", Body=b"x")
    _status_rows(region)
    calls.clear()

    _status_rows(region)

    assert calls["s3.GetObject"] == 0 and calls["dynamodb.BatchGetItem"] == 1, "only the seen-ids read"


def test_a_user_who_may_not_write_the_table_still_sees_runs_made_outside_it(region, calls):
    region.put_status(_legacy_status("scale-readonly", NOW - timedelta(days=1), 1))
    calls.refuse = {"dynamodb.PutItem", "dynamodb.UpdateItem"}

    rows = {row["run_id"]: row for row in _status_rows(region)}
    cost = region.cli("cost", "--days", "3", "--json")

    assert rows["scale-readonly"]["outcome"] == "succeeded", "read from S3 for this call"
    assert cost.exit_code == 0, cost.output
    assert "scale-readonly" in {row["run_id"] for row in json.loads(cost.stdout)["runs"]}
    calls.refuse = set()
    assert "scale-readonly" in {row["run_id"] for row in _status_rows(region)}, "recorded by the next user who may"


def test_status_of_one_run_reads_that_run_alone(region, calls):
    region.put_status(_legacy_status("scale-one", NOW - timedelta(days=3), 1))
    _status_rows(region)
    calls.clear()

    [row] = _status_rows(region, "scale-one")

    assert row["run_id"] == "scale-one"
    assert calls["s3.ListObjectsV2"] == 0 and calls["dynamodb.Query"] == 0
    assert [p["Key"] for name, p in calls.params if name == "s3.GetObject"] == [
        "runs/scale-one/attempts/1/progress.json",
        "runs/scale-one/attempts/1/cold_start.json",
    ], "its last attempt's progress and cold start, nothing else"
    assert calls["dynamodb.GetItem"] == 1


def test_status_limit_bounds_the_rows_and_reads_ec2_only_for_the_open_attempts_shown(region, calls):
    store = _store(region)
    for day in range(5):
        store.create(_record(f"scale-done-{day}", NOW - timedelta(days=10 - day), [_attempt(1, NOW - timedelta(days=10 - day), 1)]))  # noqa: E501  # fmt: skip
    store.create(_record("scale-open", NOW - timedelta(hours=1), [_attempt(1, NOW - timedelta(hours=1), None)], "running"))  # noqa: E501  # fmt: skip
    _status_rows(region)
    calls.clear()

    rows = _status_rows(region, "--limit", "3")

    assert len(rows) == 3 and rows[0]["run_id"] == "scale-open"
    asked = [params for name, params in calls.params if name == "ec2.DescribeInstances"]
    assert {"Name": "instance-id", "Values": [f"i-{1:017x}"]} in asked[0]["Filters"] + asked[1]["Filters"], (
        "the open attempt's instance, and no other"
    )
    assert not any(f["Name"] == "instance-id" and len(f["Values"]) > 1 for p in asked for f in p["Filters"])
    assert [row["launched_at"] for row in rows] == sorted((row["launched_at"] for row in rows), reverse=True)
    assert calls["ec2.DescribeInstances"] == 2, "one for the open attempts shown, one for unrecorded live instances"
    assert rows[0]["cost_usd"] == pytest.approx(G5), "the open attempt priced until now: one hour at list price"


def test_cost_this_month_counts_only_the_hours_inside_the_period(region, calls):
    store = _store(region)
    month_start = NOW.replace(day=1, hour=0)
    straddling = _attempt(1, month_start - timedelta(hours=3), 4)  # 3 h in October, 1 h in November
    store.create(_record("scale-straddle", month_start - timedelta(hours=3), [straddling]))

    result = region.cli("cost", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["since"] == "2026-11-01T00:00:00Z"
    by_run = {row["run_id"]: row for row in report["runs"]}
    assert by_run["scale-straddle"]["uptime_seconds"] == 3600
    assert by_run["scale-straddle"]["cost_usd"] == pytest.approx(G5)
    assert calls["s3.GetObject"] == 0 and calls["ec2.DescribeSpotPriceHistory"] <= 1
    region.put_status(_legacy_status("scale-october", NOW - timedelta(days=40), 2))
    later = json.loads(region.cli("cost", "--json").stdout)["runs"]
    assert "scale-october" not in {row["run_id"] for row in later}, "a run that ended in October is not this month's"


def test_cost_asks_the_spot_price_history_once_per_type_and_zone_not_per_run(region, calls):
    store = _store(region)
    for i in range(3):
        start = NOW - timedelta(hours=2 + i)
        store.create(_record(f"scale-spot-{i}", start, [_attempt(1, start, None, market="spot")], "running"))
    _status_rows(region)
    calls.clear()

    result = region.cli("cost", "--days", "1", "--json")

    assert result.exit_code == 0, result.output
    rows = {row["run_id"]: row for row in json.loads(result.stdout)["runs"]}
    assert {f"scale-spot-{i}" for i in range(3)} <= set(rows)
    assert all(rows[f"scale-spot-{i}"]["price_source"] == "spot history" for i in range(3))
    assert calls["ec2.DescribeSpotPriceHistory"] == 1, "three runs in one pool: one history"


def test_cost_of_one_run_lists_each_attempt_with_its_price(region, calls):
    store = _store(region)
    first = _attempt(1, NOW - timedelta(hours=5), 2, market="on-demand")
    second = _attempt(2, NOW - timedelta(hours=3), 1, market="on-demand")
    store.create(_record("scale-two", NOW - timedelta(hours=5), [first, second]))

    result = region.cli("cost", "--run", "scale-two")

    assert result.exit_code == 0, result.output
    assert "cost of run scale-two over its whole run" in result.stdout
    cells = {
        row[0]: row
        for row in ([c.strip() for c in line.split("│")[1:-1]] for line in result.stdout.splitlines())
        if row
    }
    assert cells["1"][4:] == ["2.00", f"{G5:.4f}", f"${2 * G5:.2f}", f"${2 * G5:.2f}", "on-demand list"]
    assert cells["2"][4:] == ["1.00", f"{G5:.4f}", f"${G5:.2f}", f"${G5:.2f}", "on-demand list"]
    assert cells["total"][6] == f"${3 * G5:.2f}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "2026-13-01"), "option '--since': got '2026-13-01'; allowed: a date as YYYY-MM-DD or YYYY-MM"),
        (("--since", "last week"), "option '--since': got 'last week'; allowed: a date as YYYY-MM-DD or YYYY-MM"),
        (("--since", "2999-01"), "option '--since': got '2999-01'; allowed: a date not in the future"),
        (("--since", "2026-11", "--days", "3"), "options '--since' and '--days': got both; allowed: one of them"),
        (("--days", "0"), "option '--days': got '0'; allowed: a whole number of at least 1"),
    ],
)
def test_cost_refuses_a_bad_period_in_one_line_before_calling_aws(region, args, message):
    assert region.usage_error("cost", *args) == f"error: {message}\n"


def test_cost_of_one_older_run_covers_its_whole_life_even_before_it_was_recorded(region, calls):
    region.put_status(_legacy_status("scale-september", datetime(2026, 9, 3, 8, 0, tzinfo=UTC), 2))

    result = region.cli("cost", "--run", "scale-september", "--json")

    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)["runs"]
    assert row["cost_usd"] == pytest.approx(2 * G5) and row["uptime_seconds"] == 2 * 3600
    assert calls["s3.ListObjectsV2"] == 0, "that run's status.json alone, not a listing of every run"


def test_cost_of_one_run_on_a_deployment_from_before_the_run_table_shows_the_run(region, calls, monkeypatch):
    from training_infra.cli import source

    monkeypatch.setattr(source, "run_store", lambda aws: None)

    region.put_status(_legacy_status("scale-no-table", NOW - timedelta(days=40), 2))

    result = region.cli("cost", "--run", "scale-no-table", "--since", "2026-10")

    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "scale-no-table" in line)
    assert f"${2 * G5:.2f}" in line and "on-demand list" in line


def test_cost_reads_a_finished_runs_summary_not_its_attempts(region, calls):
    store = _store(region)
    start = NOW - timedelta(days=2)
    store.create(_record("scale-summary", start, [_attempt(1, start, 1), _attempt(2, start + timedelta(hours=2), 2)]))

    result = region.cli("cost", "--days", "7", "--json")

    rows = {row["run_id"]: row for row in json.loads(result.stdout)["runs"]}
    assert rows["scale-summary"]["cost_usd"] == pytest.approx(3 * G5) and rows["scale-summary"]["tries"] == 2
    assert rows["scale-summary"]["uptime_seconds"] == 3 * 3600
    [query] = [params for name, params in calls.params if name == "dynamodb.Query"]
    assert "attempts" not in query["ProjectionExpression"]
    fetched = [key["run_id"]["S"] for name, p in calls.params if name == "dynamodb.BatchGetItem"
               for request in p["RequestItems"].values() for key in request["Keys"]]  # fmt: skip
    assert "scale-summary" not in fetched, "its whole record was not read"


def test_cost_of_one_run_refuses_a_bad_run_id_naming_the_option(region):
    assert region.usage_error("cost", "--run", "BAD/ID").startswith("error: option '--run': got 'BAD/ID'; allowed: ")


def test_status_of_a_run_shows_its_trainers_progress_or_that_it_reports_none(region, calls):
    store = _store(region)
    store.create(_record("scale-beats", NOW - timedelta(hours=1), [_attempt(1, NOW - timedelta(hours=1), None)], "running"))  # noqa: E501  # fmt: skip
    store.create(_record("scale-quiet", NOW - timedelta(hours=1), [_attempt(1, NOW - timedelta(hours=1), None)], "running"))  # noqa: E501  # fmt: skip
    progress = {"step": 1234567, "steps_per_second": 3.14, "changed_at": iso(NOW - timedelta(seconds=40))}
    region.client("s3").put_object(
        Bucket=region.outputs_bucket, Key="runs/scale-beats/attempts/1/progress.json", Body=json.dumps(progress)
    )

    beats = region.cli("status", "scale-beats").stdout
    quiet = region.cli("status", "scale-quiet").stdout

    assert "  progress: step 1234567, 3.14 steps/s, last progress 40 s ago" in beats
    assert "  progress: none reported yet this attempt (a trainer that never writes HEARTBEAT_FILE is judged" in quiet
    [row] = _status_rows(region, "scale-beats")
    assert row["progress"] == progress


def test_status_of_a_run_shows_each_cold_start_transfer_and_the_total(region):
    store = _store(region)
    store.create(_record("scale-cold", NOW - timedelta(hours=1), [_attempt(1, NOW - timedelta(hours=1), None)], "running"))  # noqa: E501  # fmt: skip
    store.create(_record("scale-warm", NOW - timedelta(hours=1), [_attempt(1, NOW - timedelta(hours=1), None)], "running"))  # noqa: E501  # fmt: skip
    cold = {"total_seconds": 9.8, "parts": {"image": 9.8, "data": 6.7, "checkpoints": 7.5}, "slowest": "image",
            "failed": None}  # fmt: skip
    region.client("s3").put_object(
        Bucket=region.outputs_bucket, Key="runs/scale-cold/attempts/1/cold_start.json", Body=json.dumps(cold)
    )

    shown = region.cli("status", "scale-cold").stdout
    pending = region.cli("status", "scale-warm").stdout

    assert "  cold start: 9.8 s (image 9.8 s, data 6.7 s, checkpoints 7.5 s; slowest image)" in shown
    assert "  cold start: not reported yet this attempt" in pending
    [row] = _status_rows(region, "scale-cold")
    assert row["cold_start"] == cold
