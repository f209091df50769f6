"""The agent as one attempt of a managed run: its attempt number, the run's one deadline and the
supervisor's stop request, all read from the instance tags through IMDS, as on EC2.

The real rendered user data runs under bash against moto and a fake IMDS (tests/agent/agent_harness.py);
the stop request is also sent the way `training-infra stop` sends it: a tag on the instance in the
local AWS, seen by the agent of a `LocalInstance` that plays that instance.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from datetime import UTC, datetime, timedelta

import pytest

from training_infra.local.instance import LocalInstance

pytestmark = pytest.mark.slow

LONG_TRAINING = "EPOCHS=400\nSTEP_SECONDS=0.2\nCHECKPOINT_EVERY=5"
ATTEMPT_LINE = r"\[training-infra\] attempt (\d+) started on (\S+) in (\S+) \((\S+)\)$"


def iso_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def etags(run, prefix: str) -> dict[str, str]:
    listed = run.s3.list_objects_v2(Bucket=run.config.outputs_bucket, Prefix=prefix).get("Contents", [])
    return {obj["Key"]: obj["ETag"] for obj in listed}


def stream_messages(run) -> list[str]:
    logs = run.extra["session"].client("logs", endpoint_url=run.aws.endpoint)
    events = logs.get_log_events(logGroupName=run.config.log_group, logStreamName=run.run_id, startFromHead=True)
    return [event["message"] for event in events["events"]]


def test_attempt_2_resumes_writes_its_own_record_and_leaves_attempt_1_alone(make_run):
    training = "EPOCHS=30\nSTEP_SECONDS=0.2\nCHECKPOINT_EVERY=5"
    first = make_run(
        run_id="managed", checkpoint_sync_seconds=300, extra_env=training, tags={"training-infra:attempt": "1"}
    )
    first.start().wait_for_log(r"checkpoint ckpt-000005")
    first.imds.inject_spot_interruption()
    first.wait(90)
    assert first.attempt_status(1)["outcome"] == "interrupted"
    attempt_1 = etags(first, "runs/managed/attempts/1/")
    assert sorted(attempt_1) == [
        "runs/managed/attempts/1/cold_start.json",
        "runs/managed/attempts/1/logs/metrics.jsonl",
        "runs/managed/attempts/1/logs/training-setup.log",
        "runs/managed/attempts/1/logs/training.log",
        "runs/managed/attempts/1/progress.json",
        "runs/managed/attempts/1/status.json",
    ]
    numbers = [re.search(r"ckpt-(\d+)", key) for key in first.keys("checkpoints/managed/")]
    saved = max(int(found.group(1)) for found in numbers if found)  # not the _manifest.json

    # Attempt 2: another instance (type, zone) of the same run, same buckets and log group.
    second = make_run(run_id="managed", tags={"training-infra:attempt": "2"})
    second.config = dataclasses.replace(first.config)
    second.imds.instance_type, second.imds.availability_zone = "g6.xlarge", "us-east-1b"
    second.run()

    assert etags(second, "runs/managed/attempts/1/") == attempt_1, "attempt 2 changed nothing of attempt 1"
    record = second.attempt_status(2)
    assert (record["attempt"], record["outcome"], record["instance_type"]) == (2, "succeeded", "g6.xlarge")
    assert second.status() == record, "the run's summary is now attempt 2's record"
    assert f"resumed from checkpoint ckpt-{saved:06d}.npz (epoch {saved})" in second.read(second.log_key(attempt=2))
    metrics = json.loads(second.read("runs/managed/outputs/metrics.json"))
    assert (metrics["resumed_from_epoch"], metrics["epochs_completed"]) == (saved, 30), "the resumed trainer's outputs"
    assert "runs/managed/logs/training.log" not in second.keys("runs/managed/"), "logs live under their attempt"
    assert "runs/managed/_SUCCESS" in second.keys("runs/managed/")
    assert json.loads(second.read("runs/latest/status.json"))["attempt"] == 2

    messages = stream_messages(second)
    starts = [(i, re.search(ATTEMPT_LINE, m).groups()) for i, m in enumerate(messages) if re.search(ATTEMPT_LINE, m)]
    assert [groups for _, groups in starts] == [
        ("1", "g5.xlarge", "us-east-1a", "spot"),
        ("2", "g6.xlarge", "us-east-1b", "spot"),
    ], "one stream for the run, a start line per attempt"
    assert starts[0][0] == 0 and any("received SIGTERM" in m for m in messages[: starts[1][0]]), (
        "each attempt's first line opens its part of the stream, in order"
    )


def test_deadline_at_already_past_ends_at_once_as_deadline_with_status_and_logs_uploaded(make_run):
    deadline = iso_in(-60)
    run = make_run(run_id="past-deadline", deadline_at=deadline).run(timeout=60)

    status = run.status()
    assert status["outcome"] == "deadline" and status["exit_code"] is None
    assert status["message"] == f"the run's deadline {deadline} passed before the trainer started"
    assert run.attempt_status(1) == status
    assert "starting trainer" not in run.setup_log
    assert "ecr" not in {r.service for r in run.proxy.requests}, "no image pulled"
    assert not [r for r in run.proxy.requests if r.path.startswith(f"/{run.config.data_bucket}")], "no data synced"
    assert run.keys(run.log_key("")) == [run.log_key("training-setup.log"), run.log_key("training.log")]
    assert run.called("shutdown -h +1 "), "past deadline: the OS deadline gives the report one minute"
    assert run.called("poweroff")


def test_deadline_at_near_stops_the_trainer_at_that_instant_whatever_max_runtime_says(make_run):
    deadline = iso_in(25)
    run = make_run(run_id="near-deadline", deadline_at=deadline, max_runtime_seconds=3600, extra_env=LONG_TRAINING)
    run.run()

    status = run.status()
    assert status["outcome"] == "deadline" and status["message"] == f"the run's deadline {deadline} reached"
    ended = datetime.strptime(status["ended_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((ended - datetime.strptime(deadline, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)).total_seconds()) <= 15
    assert json.loads(run.read("runs/near-deadline/outputs/metrics.json"))["interrupted"] is True
    assert run.keys("checkpoints/near-deadline/"), "the checkpoint written on SIGTERM reached S3"
    assert [call.split(" training-infra")[0] for call in run.called("shutdown")] == ["shutdown -h +1"] * 2, (
        "the OS deadline (the bootstrap's, then the agent's) is the deadline's minute, not max runtime's 60"
    )
    assert run.called("poweroff")


def test_deadline_tag_is_the_deadline_when_deadline_at_is_empty(make_run):
    deadline = iso_in(25)
    run = make_run(run_id="tag-deadline", max_runtime_seconds=3600, extra_env=LONG_TRAINING,
                   tags={"training-infra:deadline": deadline})  # fmt: skip
    run.run()

    status = run.status()
    assert status["outcome"] == "deadline" and status["message"] == f"the run's deadline {deadline} reached"
    shutdowns = [
        (at, call.split(" training-infra")[0])
        for at, call in run.calls
        if call.startswith("shutdown") and call in run.agent_called("shutdown")
    ]
    assert [call for _, call in shutdowns] == ["shutdown -h +60", "shutdown -h +1"], (
        "max runtime before any network call, then the tag's deadline replaces it"
    )
    assert shutdowns[0][0] < min(r.at for r in run.imds.requests) < shutdowns[1][0]
    assert status["duration_seconds"] < 50


def test_bad_deadline_at_fails_with_one_line_before_any_network_call(make_run):
    run = make_run(run_id="bad-deadline", deadline_at="tomorrow 6pm").run(timeout=60)

    assert run.status()["message"] == (
        "TI_DEADLINE_AT='tomorrow 6pm' is not allowed: use an ISO 8601 UTC time such as 2026-11-29T18:00:00Z"
    )
    assert run.imds.requests == [] and not run.agent_called("shutdown")
    assert run.called("poweroff")


def test_malformed_attempt_tag_fails_the_run_and_records_it_where_no_real_attempt_writes(make_run):
    run = make_run(run_id="bad-attempt", tags={"training-infra:attempt": "two"}).run(timeout=60)

    status = run.attempt_status(0)
    assert (status["attempt"], status["outcome"]) == (0, "failed")
    assert status["message"] == "tag training-infra:attempt='two' is not allowed: use a whole number from 1"
    assert run.keys("runs/bad-attempt/attempts/") == [
        "runs/bad-attempt/attempts/0/logs/training-setup.log",
        "runs/bad-attempt/attempts/0/logs/training.log",
        "runs/bad-attempt/attempts/0/status.json",
    ]
    assert run.called("poweroff")


# The tag's other values (stall, user, anything) are test_agent_watchers' units: one end-to-end stop suffices.
@pytest.mark.parametrize(("reason", "outcome"), [("budget", "budget")])
def test_stop_tag_mid_run_ends_gracefully_with_the_reason_as_outcome(make_run, reason, outcome):
    run = make_run(run_id=f"stop-{reason}", checkpoint_sync_seconds=300, extra_env=LONG_TRAINING).start()
    run.wait_for_log(r"epoch 3/")
    tagged_at = time.time()
    run.imds.set_tag("training-infra:stop", reason)
    run.wait(90)

    sigterm_at = float(run.wait_for_log(r"received SIGTERM at ([0-9.]+)").group(1))
    assert sigterm_at - tagged_at <= 6, "within one poll (1 s here) and the docker/kill path"
    status = run.status()
    assert (status["outcome"], status["message"]) == (outcome, f"stop requested (tag training-infra:stop={reason})")
    assert run.keys(f"checkpoints/stop-{reason}/"), "the checkpoint written on SIGTERM reached S3"
    assert json.loads(run.read(f"runs/stop-{reason}/outputs/metrics.json"))["interrupted"] is True
    assert f"runs/stop-{reason}/_SUCCESS" not in run.keys(f"runs/stop-{reason}/")
    assert run.called("poweroff")


def test_stop_tag_put_on_the_instance_in_the_local_aws_stops_its_agent_as_stopped(make_run, aws):
    """The path of `training-infra stop RUN`: CreateTags on the instance; the agent reads it through IMDS."""
    run = make_run(run_id="stop-user", checkpoint_sync_seconds=300, extra_env=LONG_TRAINING)
    ec2 = run.extra["session"].client("ec2", endpoint_url=aws.endpoint)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    tags = {"training-infra:managed": "true", "training-infra:run-id": "stop-user", "training-infra:attempt": "3"}
    instance_id = ec2.run_instances(
        ImageId=image, MinCount=1, MaxCount=1, InstanceType="g5.xlarge", UserData=run.user_data(),
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )["Instances"][0]["InstanceId"]  # fmt: skip
    fast = {name: run.env[name] for name in ("TI_RETRY_BASE_SECONDS", "TI_LOG_SHIP_SECONDS")}
    box = LocalInstance(instance_id, root=run.tmp / "box", aws_env=aws.env, extra_env=fast)
    training_log = box.root / "fs" / "var" / "log" / "training.log"
    with box:
        deadline = time.monotonic() + 60
        while "epoch 3/" not in (training_log.read_text() if training_log.exists() else ""):
            assert time.monotonic() < deadline and box.process.poll() is None, box.log_path.read_text()
            time.sleep(0.2)
        ec2.create_tags(Resources=[instance_id], Tags=[{"Key": "training-infra:stop", "Value": "user"}])
        box.wait(90)

    status = run.attempt_status(3)
    assert (status["attempt"], status["outcome"]) == (3, "stopped")
    assert status["message"] == "stop requested (tag training-infra:stop=user)"
    assert run.status() == status
    assert run.keys("checkpoints/stop-user/") and "received SIGTERM" in run.read(run.log_key(attempt=3))
    assert box.powered_off_marker.exists()
    state = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state == "terminated", "the power-off terminated the instance, as shutdown behaviour terminate does"
