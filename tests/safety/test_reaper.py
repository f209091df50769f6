"""The reaper handler against moto's EC2, SNS, SQS and CloudWatch (`mock_aws`, in process; see conftest.py).

Notices are read back through a real SNS -> SQS subscription, the metric through CloudWatch, and
instance states through DescribeInstances: what a user would see.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.safety.conftest import PROFILE_ARN_PREFIX
from training_infra import naming
from training_infra.safety.runtime import reaper

MAX_HOURS = 12.0
GRACE_MINUTES = 10.0


def reap(aws, now: datetime) -> reaper.ReapResult:
    config = reaper.ReaperConfig(
        topic_arn=aws.topic_arn,
        max_runtime_hours=MAX_HOURS,
        instance_profile_arn_prefix=PROFILE_ARN_PREFIX,
        grace_minutes=GRACE_MINUTES,
    )
    return reaper.reap(aws.ec2, aws.sns, aws.cloudwatch, config, now)


def terminated_metric_sum(aws, now: datetime) -> float:
    stats = aws.cloudwatch.get_metric_statistics(
        Namespace=naming.METRIC_NAMESPACE,
        MetricName=reaper.METRIC_NAME,
        StartTime=now - timedelta(hours=1),
        EndTime=now + timedelta(hours=1),
        Period=300,
        Statistics=["Sum"],
    )
    return sum(point["Sum"] for point in stats["Datapoints"])


def managed(run_id: str = "bert-1", **tags: str) -> dict[str, str]:
    return {naming.TAG_MANAGED: "true", naming.TAG_RUN_ID: run_id, **tags}


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_defaults_match_the_names_the_construct_and_cli_use():
    assert reaper.DEFAULT_MANAGED_TAG == naming.TAG_MANAGED
    assert reaper.DEFAULT_RUN_ID_TAG == naming.TAG_RUN_ID
    assert reaper.DEFAULT_DEADLINE_TAG == naming.TAG_DEADLINE
    assert reaper.DEFAULT_MAX_RUNTIME_TAG == naming.TAG_MAX_RUNTIME_HOURS
    assert reaper.DEFAULT_NAMESPACE == naming.METRIC_NAMESPACE


def test_the_longest_runtime_is_the_one_the_settings_allow():
    assert reaper.RUNTIME_LIMIT_HOURS == naming.MAX_RUNTIME_HOURS_LIMIT == 168


def test_instance_past_its_deadline_is_terminated_with_a_notice_and_a_metric(aws):
    now = datetime.now(UTC)
    deadline = now - timedelta(hours=1)
    instance_id = aws.launch(managed("bert-lr3e4", **{naming.TAG_DEADLINE: iso(deadline)}))

    result = reap(aws, now)

    assert result.terminated == [instance_id]
    assert aws.state(instance_id) in ("shutting-down", "terminated")
    [notice] = aws.notices()
    assert instance_id in notice["Subject"] and "bert-lr3e4" in notice["Subject"]
    assert f"deadline {iso(deadline)}" in notice["Message"]
    assert "g5.xlarge" in notice["Message"]
    assert terminated_metric_sum(aws, now) == 1


def test_instance_inside_its_deadline_keeps_running_and_nothing_is_sent(aws):
    now = datetime.now(UTC)
    instance_id = aws.launch(managed(**{naming.TAG_DEADLINE: iso(now + timedelta(hours=3))}))

    result = reap(aws, now)

    assert result.checked == [instance_id] and result.terminated == []
    assert aws.state(instance_id) == "running"
    assert aws.notices() == []
    assert terminated_metric_sum(aws, now) == 0


def test_reaper_leaves_the_on_box_shutdown_its_grace_period(aws):
    now = datetime.now(UTC)
    just_past = aws.launch(
        managed("just-past", **{naming.TAG_DEADLINE: iso(now - timedelta(minutes=GRACE_MINUTES / 2))})
    )
    long_past = aws.launch(
        managed("long-past", **{naming.TAG_DEADLINE: iso(now - timedelta(minutes=GRACE_MINUTES + 1))})
    )

    result = reap(aws, now)

    assert result.terminated == [long_past]
    assert aws.state(just_past) == "running"


def test_unmanaged_instances_are_never_touched_however_old_or_late(aws):
    past = {naming.TAG_DEADLINE: iso(datetime.now(UTC) - timedelta(days=3))}
    untagged = aws.launch({})
    not_true = aws.launch({naming.TAG_MANAGED: "false", **past})
    other_team = aws.launch({"team": "search", **past})
    much_later = aws.launch_time(untagged) + timedelta(days=30)

    result = reap(aws, much_later)

    assert result.checked == [] and result.terminated == []
    assert {aws.state(i) for i in (untagged, not_true, other_team)} == {"running"}
    assert aws.notices() == []


def test_instance_without_deadline_ends_once_older_than_max_runtime_hours(aws):
    instance_id = aws.launch(managed("no-deadline"))
    launched = aws.launch_time(instance_id)
    grace = timedelta(minutes=GRACE_MINUTES)

    assert reap(aws, launched + timedelta(hours=MAX_HOURS) + grace - timedelta(minutes=1)).terminated == []
    assert aws.state(instance_id) == "running"

    result = reap(aws, launched + timedelta(hours=MAX_HOURS) + grace + timedelta(minutes=1))

    assert result.terminated == [instance_id]
    [notice] = aws.notices()
    assert "12 h after launch (the stack's max_runtime_hours)" in notice["Message"]


def test_per_instance_max_runtime_tag_overrides_the_stack_default(aws):
    short = aws.launch(managed("short", **{naming.TAG_MAX_RUNTIME_HOURS: "2"}))
    default = aws.launch(managed("default"))
    three_hours_later = aws.launch_time(short) + timedelta(hours=3)

    result = reap(aws, three_hours_later)

    assert result.terminated == [short]
    assert aws.state(default) == "running"


@pytest.mark.parametrize("bad", ["tomorrow", "2026-13-45T99:00:00Z", "2026-11-28T18:00:00", ""])
def test_unreadable_deadline_is_reported_and_falls_back_to_max_runtime(aws, bad):
    instance_id = aws.launch(managed("typo", **{naming.TAG_DEADLINE: bad}))
    launched = aws.launch_time(instance_id)

    young = reap(aws, launched + timedelta(hours=1))

    assert young.terminated == []
    assert young.unreadable_tags == {instance_id: f"{naming.TAG_DEADLINE}={bad!r}"}
    assert aws.state(instance_id) == "running"

    old = reap(aws, launched + timedelta(hours=MAX_HOURS + 1))

    assert old.terminated == [instance_id]
    [notice] = aws.notices()
    assert f"unreadable tag {naming.TAG_DEADLINE}={bad!r}" in notice["Message"]


def test_unreadable_max_runtime_tag_is_reported_and_the_default_applies(aws):
    instance_id = aws.launch(managed("typo", **{naming.TAG_MAX_RUNTIME_HOURS: "twelve"}))
    launched = aws.launch_time(instance_id)

    result = reap(aws, launched + timedelta(hours=MAX_HOURS + 1))

    assert result.terminated == [instance_id]
    assert result.unreadable_tags == {instance_id: f"{naming.TAG_MAX_RUNTIME_HOURS}='twelve'"}


def test_stopped_instance_past_its_deadline_is_terminated_too(aws):
    """A stopped instance still pays for its volume; the deadline covers it as well."""
    now = datetime.now(UTC)
    instance_id = aws.launch(managed(**{naming.TAG_DEADLINE: iso(now - timedelta(hours=2))}))
    aws.ec2.stop_instances(InstanceIds=[instance_id])

    assert reap(aws, now).terminated == [instance_id]


def test_many_instances_across_pages_are_all_found_and_terminated(aws, monkeypatch):
    monkeypatch.setattr(reaper, "PAGE_SIZE", 5)
    now = datetime.now(UTC)
    expired = [
        aws.launch(managed(f"run-{n}", **{naming.TAG_DEADLINE: iso(now - timedelta(hours=1))})) for n in range(12)
    ]
    alive = [
        aws.launch(managed(f"alive-{n}", **{naming.TAG_DEADLINE: iso(now + timedelta(hours=1))})) for n in range(3)
    ]

    pages = []
    aws.ec2.meta.events.register("before-call.ec2.DescribeInstances", lambda **_: pages.append(1))

    result = reap(aws, now)

    assert len(pages) == 3  # 15 instances, 5 a page: every page was read
    assert len(result.checked) == 15
    assert sorted(result.terminated) == sorted(expired)
    assert {aws.state(i) for i in alive} == {"running"}
    assert len(aws.notices()) == 12
    assert terminated_metric_sum(aws, now) == 12


def test_handler_reports_an_instance_it_cannot_terminate_after_ending_the_others(aws, monkeypatch):
    """Termination protection (or a changed tag) must not hide: the run fails so the Errors alarm fires."""
    past = {naming.TAG_DEADLINE: iso(datetime.now(UTC) - timedelta(hours=1))}
    protected = aws.launch(managed("protected", **past))
    aws.ec2.modify_instance_attribute(InstanceId=protected, DisableApiTermination={"Value": True})
    normal = aws.launch(managed("normal", **past))
    monkeypatch.setenv("MAX_RUNTIME_HOURS", "12")

    with pytest.raises(reaper.ReaperError, match=protected):
        reaper.handler({}, None)

    assert aws.state(normal) in ("shutting-down", "terminated")
    assert aws.state(protected) == "running"
    assert len(aws.notices()) == 1


def test_handler_reads_max_runtime_grace_and_tag_names_from_the_environment(aws, monkeypatch):
    """The variables the construct sets are the ones the handler obeys (defaults would not end this one)."""
    instance_id = aws.launch({"acme:managed": "true"})
    monkeypatch.setenv("MANAGED_TAG", "acme:managed")
    monkeypatch.setenv("MAX_RUNTIME_HOURS", "0.5")
    monkeypatch.setattr(reaper, "datetime", _Later)  # 'now' one hour after moto's launch time

    monkeypatch.setenv("GRACE_MINUTES", "45")  # 30 min + 45 min grace: not yet
    waiting = reaper.handler({"source": "aws.events"}, None)
    monkeypatch.setenv("GRACE_MINUTES", "15")  # 30 min + 15 min grace: past
    ending = reaper.handler({"source": "aws.events"}, None)

    assert waiting["checked"] == 1 and waiting["terminated"] == []
    assert ending["terminated"] == [instance_id]
    [notice] = aws.notices()
    assert "0.5 h after launch (the stack's max_runtime_hours)" in notice["Message"]


class _Later(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) + timedelta(hours=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28T18:00:00Z", datetime(2026, 11, 28, 18, tzinfo=UTC)),
        ("2026-11-28T19:00:00+01:00", datetime(2026, 11, 28, 18, tzinfo=UTC)),
        ("2026-11-28T18:00:00", None),  # no zone: refused rather than guessed
        ("not a date", None),
        ("9999-12-31T23:59:59-01:00", None),  # past the calendar's end once in UTC
    ],
)
def test_parse_deadline_accepts_only_zoned_iso_times(text, expected):
    assert reaper.parse_deadline(text) == expected


# --- a bad tag on one instance never shields the others (issue 15, item 3) -------------------


@pytest.mark.parametrize(
    ("far", "hours", "why"),
    [
        ("9999-12-31T23:59:59Z", 168, "168 h after launch (the longest run allowed)"),
        # Out of the calendar once in UTC: unreadable, so the stack's max runtime applies.
        ("9999-12-31T23:59:59-01:00", MAX_HOURS, "12 h after launch (the stack's max_runtime_hours)"),
        ("0001-01-01T00:00:00+01:00", MAX_HOURS, "12 h after launch (the stack's max_runtime_hours)"),
    ],
)
def test_deadline_at_the_calendars_edge_neither_stops_the_sweep_nor_outlives_the_168_hour_limit(aws, far, hours, why):
    now = datetime.now(UTC)
    odd = aws.launch(managed("odd", **{naming.TAG_DEADLINE: far}))  # listed first: it used to stop the sweep
    expired = aws.launch(managed("expired", **{naming.TAG_DEADLINE: iso(now - timedelta(hours=1))}))

    result = reap(aws, now)

    assert result.terminated == [expired]
    assert result.failed == {}
    assert aws.state(odd) == "running"

    limit = aws.launch_time(odd) + timedelta(hours=hours, minutes=GRACE_MINUTES)
    assert reap(aws, limit - timedelta(minutes=1)).terminated == []
    assert reap(aws, limit + timedelta(minutes=1)).terminated == [odd]
    assert why in aws.notices()[-1]["Message"]


def test_deadline_tag_later_than_launch_plus_168_hours_is_held_to_the_limit(aws):
    instance_id = aws.launch(managed("extended"))
    launched = aws.launch_time(instance_id)
    aws.ec2.create_tags(
        Resources=[instance_id], Tags=[{"Key": naming.TAG_DEADLINE, "Value": iso(launched + timedelta(hours=400))}]
    )

    result = reap(aws, launched + timedelta(hours=169))

    assert result.terminated == [instance_id]


def test_max_runtime_tag_above_168_hours_is_held_to_the_limit(aws):
    instance_id = aws.launch(managed("long", **{naming.TAG_MAX_RUNTIME_HOURS: "8000"}))
    launched = aws.launch_time(instance_id)

    result = reap(aws, launched + timedelta(hours=169))

    assert result.terminated == [instance_id]
    assert result.unreadable_tags == {instance_id: f"{naming.TAG_MAX_RUNTIME_HOURS}='8000'"}


def test_an_instance_that_fails_unexpectedly_is_recorded_the_sweep_goes_on_and_the_handler_fails(aws, monkeypatch):
    """Any error on one instance (here a network error on its TerminateInstances) is that instance's alone."""
    past = {naming.TAG_DEADLINE: iso(datetime.now(UTC) - timedelta(hours=1))}
    unlucky = aws.launch(managed("unlucky", **past))
    others = [aws.launch(managed(f"other-{n}", **past)) for n in range(2)]
    ec2 = reaper.boto3.client("ec2")

    def flaky(params, **_):
        if params.get("InstanceIds") == [unlucky]:
            raise ConnectionResetError("connection reset by peer")

    ec2.meta.events.register("before-parameter-build.ec2.TerminateInstances", flaky)
    real_client = reaper.boto3.client
    monkeypatch.setattr(reaper.boto3, "client", lambda name, **kw: ec2 if name == "ec2" else real_client(name, **kw))
    monkeypatch.setenv("MAX_RUNTIME_HOURS", "12")

    with pytest.raises(reaper.ReaperError, match=f"{unlucky}.*ConnectionResetError"):
        reaper.handler({}, None)

    assert {aws.state(i) for i in others} <= {"shutting-down", "terminated"}
    assert aws.state(unlucky) == "running"
    assert len(aws.notices()) == 2


# --- the reaper cannot be aimed at other instances (issue 15, item 4) ------------------------


@pytest.mark.parametrize("profile", [None, "other"])
def test_instance_tagged_managed_but_not_launched_with_the_project_profile_is_never_touched(aws, profile):
    """Anyone with ec2:CreateTags can add the managed tag; only the project's launches carry its instance profile."""
    now = datetime.now(UTC)
    past = {naming.TAG_DEADLINE: iso(now - timedelta(days=3))}
    production = aws.launch(managed("not-ours", **past), profile=profile)
    ours = aws.launch(managed("ours", **past))

    result = reap(aws, now)

    assert result.terminated == [ours]
    assert result.checked == [ours]
    assert result.ignored == [production]
    assert aws.state(production) == "running"
    assert len(aws.notices()) == 1
