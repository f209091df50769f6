"""Issue 12 on the box: the trainer's progress beats, stalls, diagnostics and what status.json says.

The real agent (process runtime, the example trainer) against moto and a fake IMDS: a trainer that
hangs at full GPU is stopped as `stalled` after diagnostics, one that never beats is not judged, a
heartbeat that is not JSON counts as a touch, and the step, its rate and the time it last changed
reach status.json, the attempt's progress.json and CloudWatch (namespace TrainingInfra, RunId).
"""

from __future__ import annotations

import calendar
import dataclasses
import json
import os
import shutil
import sys
import time

import pytest
from agent_harness import HUNG_TRAINER, HUNG_TRAINER_COMMAND, diagnostic_sections, hung_trainer_stack

pytestmark = pytest.mark.slow

PROGRESS_KEYS = {"step", "steps_per_second", "changed_at"}


def metric_names(run) -> set[str]:
    cloudwatch = run.extra["session"].client("cloudwatch", endpoint_url=run.aws.endpoint)
    metrics = cloudwatch.list_metrics(Namespace="TrainingInfra", Dimensions=[{"Name": "RunId", "Value": run.run_id}])
    return {metric["MetricName"] for metric in metrics["Metrics"]}


def test_a_trainer_hung_at_full_gpu_is_stopped_as_stalled_after_diagnostics_with_the_graceful_stop(make_run):
    run = make_run(
        run_id="stall-run",
        stall_seconds=4,
        stop_grace_seconds=2,
        extra_env="EPOCHS=400\nSTEP_SECONDS=0.2\nHANG_AT_EPOCH=4",
    )
    (run.tmp / "gpu-util").write_text("100\n")  # a hung NCCL collective keeps the GPU busy: not idle
    run.run()

    status = run.status()
    assert status["outcome"] == "stalled", run.setup_log
    # A process-runtime trainer was given the host's path (HEARTBEAT_FILE): the message names that one.
    assert status["message"].startswith(f"no progress in {run.root}/"), status["message"]
    assert "/progress/heartbeat.json for " in status["message"]
    assert status["message"].endswith("s (last step 3)")
    assert status["progress"]["step"] == 3 and set(status["progress"]) == PROGRESS_KEYS
    assert status["exit_code"] == 137, "the hung trainer ignored SIGTERM and was killed after the grace period"
    training_log = run.read(run.log_key("training.log"))
    assert "outcome stalled" in training_log and "SIGKILL" in training_log, "the graceful stop, then the kill"
    # The history `training-infra watch` reads went up with the logs: the trainer's beats, loss included.
    history = [json.loads(line) for line in run.read(run.log_key("metrics.jsonl")).splitlines()]
    assert history and all(isinstance(line["loss"], float) for line in history)
    assert history[0]["step"] >= 1 and history[-1]["step"] <= 3
    diagnostics = run.read(run.log_key("training-diagnostics.txt"))
    for section in ("process tree", "the trainer's last 200 log lines", "py-spy"):
        assert section in diagnostics, section
    assert "train.py" in diagnostics.split("process tree", 1)[1], "the trainer is in the process tree"
    assert "\n100\n" in diagnostics, "nvidia-smi's output (the fake's)"
    assert "simulating a hang" in diagnostics, "the trainer's own last lines"
    assert {"Progress", "TrainingStep"} <= metric_names(run)
    assert run.called("poweroff")


def test_stall_diagnostics_hold_the_process_tree_nvidia_smi_the_py_spy_stack_of_the_hung_function_and_the_log(
    make_run,
):
    run = make_run(run_id="hung-stack", stall_seconds=3, stop_grace_seconds=2, training_command=HUNG_TRAINER_COMMAND)
    run.s3.put_object(Bucket=run.config.data_bucket, Key="data/hung_trainer.py", Body=HUNG_TRAINER.encode())
    (run.tmp / "gpu-util").write_text("100\n")
    run.run()

    assert run.status()["outcome"] == "stalled", run.setup_log
    diagnostics = run.read(run.log_key("training-diagnostics.txt"))
    sections = diagnostic_sections(diagnostics)
    assert "hung_trainer.py" in sections["process tree"]
    assert sections[run.env["TI_NVIDIA_SMI"]] == "100\n", "nvidia-smi's output (the fake's)"
    assert "wait_for_allreduce (hung_trainer.py:" in hung_trainer_stack(diagnostics), diagnostics
    assert "step 1 done; entering allreduce" in sections["the trainer's last 200 log lines"]


def test_a_trainer_that_never_reports_progress_is_not_judged_by_it(make_run):
    run = make_run(run_id="silent-run", stall_seconds=1, training_command="sleep 6")
    run.run()

    status = run.status()
    assert status["outcome"] == "succeeded", run.setup_log
    assert status["progress"] is None, "status says progress is not reported"
    assert "Progress" not in metric_names(run)


# A heartbeat under /checkpoints comes back with the checkpoints (`aws s3 sync` gives a restored file
# its object's LastModified) or stays on the disk of a reused root: either way written before this
# attempt's trainer started. Here: left on disk, an hour old.
@pytest.mark.parametrize(
    ("command", "last_step"),
    [('sleep 5; echo \'{"step": 6}\' > "$HEARTBEAT_FILE"; sleep 2', 6)],
    ids=["trainer-beats-after-5s"],
)
def test_a_heartbeat_written_before_the_trainer_started_is_no_beat_and_never_stalls_the_attempt(
    make_run, command, last_step
):
    run = make_run(
        run_id="old-beat",
        stall_seconds=3,
        training_command=command,
        env={"TI_HEARTBEAT_FILE": "/checkpoints/heartbeat.json"},
    )
    left = run.root / "checkpoints" / "heartbeat.json"
    left.parent.mkdir(parents=True)
    left.write_text('{"step": 5}')
    an_hour_ago = time.time() - 3600
    os.utime(left, (an_hour_ago, an_hour_ago))
    run.run()

    status = run.status()
    assert status["outcome"] == "succeeded", f"the old file stalled the attempt: {status['message']}"
    assert status["progress"]["step"] == last_step, "the trainer's own beat, not the old file's step 5"
    assert status["progress"]["changed_at"] >= status["started_at"]


def test_json_beats_reach_status_progress_json_and_the_step_and_rate_metrics(make_run):
    # A look every second (stall_seconds under 30) and metrics at each look with progress (production:
    # at most once a minute), over 10 s of training: ten looks with progress.
    run = make_run(
        run_id="beats-run",
        stall_seconds=20,
        extra_env="EPOCHS=20\nSTEP_SECONDS=0.5",
        env={"TI_PROGRESS_METRIC_SECONDS": "1"},
    )
    run.run()

    status = run.status()
    assert status["outcome"] == "succeeded", run.setup_log
    progress = status["progress"]
    assert progress["step"] == 20 and 0 < progress["steps_per_second"] <= 2, "at most one epoch per 0.5 s"
    assert json.loads(run.read("runs/beats-run/attempts/1/progress.json")).keys() == PROGRESS_KEYS
    assert {"Progress", "TrainingStep", "StepsPerSecond"} <= metric_names(run)


# ---------------------------------------------------------------- checkpoints: freshness and the manifest


def test_s3_refusing_checkpoint_uploads_mid_run_gives_one_notice_and_training_goes_on(make_run):
    run = make_run(
        run_id="stale-ckpt",
        checkpoint_sync_seconds=2,
        # A save every 3 s, each kept for 9 s: a checkpoint saved and rotated away inside one upload
        # (faster than the AWS CLI starts) keeps the previous manifest, so no set would ever be complete.
        extra_env="EPOCHS=150\nSTEP_SECONDS=0.3\nCHECKPOINT_EVERY=10",
    ).start()
    assert run.wait_for_s3("checkpoints/stale-ckpt/_manifest.json", timeout=60), run.setup_log
    run.proxy.refuse_s3_writes_under = "/checkpoints/"
    run.wait(timeout=180)

    status = run.status()
    assert status["outcome"] == "succeeded" and status["progress"]["step"] == 150, "training went on to the end"
    assert "(final checkpoint sync failed)" in status["message"]
    assert run.training_log.count("uploads are failing") == 1, "once per run, not once per sync"
    queue = run.extra["queue_url"]
    notices = run.extra["sqs"].receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=2)["Messages"]
    subjects = [json.loads(notice["Body"])["Subject"] for notice in notices]
    assert "training-infra run stale-ckpt: checkpoints are not reaching S3" in subjects
    assert "CheckpointStale" in metric_names(run)


def test_a_heartbeat_kept_under_checkpoints_is_no_newer_checkpoint_for_the_freshness_check(make_run):
    """The heartbeat there is never synced (so never restored as an old beat): S3 cannot hold a newer
    copy, and a trainer that beats every step but checkpoints rarely must not look like failing uploads."""
    run = make_run(
        run_id="beat-in-ckpt",
        checkpoint_sync_seconds=1,
        # One checkpoint, at the end; 12 s of beats: a beat taken for a checkpoint would look stale after ~3 s.
        extra_env="EPOCHS=40\nSTEP_SECONDS=0.3\nCHECKPOINT_EVERY=1000",
        env={"TI_HEARTBEAT_FILE": "/checkpoints/heartbeat.json"},
    )
    run.run()

    assert run.status()["outcome"] == "succeeded", run.setup_log
    assert run.status()["progress"]["step"] == 40, "the beats were read from /checkpoints"
    assert "uploads are failing" not in run.training_log, run.setup_log
    assert not [s for s in alert_subjects(run) if s.endswith("checkpoints are not reaching S3")]


def alert_subjects(run) -> list[str]:
    """Every notice on the run's alert topic so far (its SQS subscription, drained)."""
    subjects, sqs, queue = [], run.extra["sqs"], run.extra["queue_url"]
    while batch := sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages"):
        subjects += [json.loads(message["Body"])["Subject"] for message in batch]
        sqs.delete_message_batch(
            QueueUrl=queue, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)]
        )
    return subjects


def stale_then_reclaimed(run, *, syncs_after: int = 1) -> None:
    """Start the attempt, refuse its checkpoint uploads once one sync landed, wait for the freshness
    warning and `syncs_after` more failed syncs (the check is done), then end it with a spot notice as
    a reclaim would."""
    run.start()
    assert run.wait_for_s3(f"checkpoints/{run.run_id}/_manifest.json", timeout=60), run.setup_log
    run.proxy.refuse_s3_writes_under = "/checkpoints/"
    run.wait_for_log("uploads are failing", timeout=90)
    failed_before = run.setup_log.count("periodic checkpoint sync failed")
    deadline = time.monotonic() + 60
    while run.setup_log.count("periodic checkpoint sync failed") < failed_before + syncs_after:
        assert time.monotonic() < deadline, run.setup_log
        time.sleep(0.5)
    run.imds.inject_spot_interruption()
    run.wait(timeout=120)
    run.imds.clear_notices()


def test_checkpoint_uploads_failing_in_two_attempts_of_a_run_give_one_notice_and_a_log_line_in_each(make_run):
    # A managed run: its attempts share the deadline tag, which names the run's notice marker.
    deadline = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    run = make_run(
        run_id="stale-twice",
        checkpoint_sync_seconds=1,
        extra_env="EPOCHS=400\nSTEP_SECONDS=0.3\nCHECKPOINT_EVERY=2",
        tags={"training-infra:deadline": deadline, "training-infra:attempt": "1"},
    )
    stale_then_reclaimed(run)
    assert run.attempt_status(1)["outcome"] == "interrupted", run.setup_log
    # The next attempt is a fresh box (nothing of $STATE survives), and S3 still refuses its checkpoints.
    shutil.rmtree(run.root)
    run.proxy.refuse_s3_writes_under = ""
    run.imds.set_tag("training-infra:attempt", "2")
    stale_then_reclaimed(run)
    assert run.attempt_status(2)["outcome"] == "interrupted", run.setup_log

    stale = [s for s in alert_subjects(run) if s == "training-infra run stale-twice: checkpoints are not reaching S3"]
    assert len(stale) == 1, "one notice for the run, not one per attempt"
    first, second = (run.read(run.log_key("training.log", attempt)) for attempt in (1, 2))
    assert first.count("uploads are failing (said once; notice sent)") == 1, first
    assert second.count("uploads are failing (said once; an earlier attempt of this run sent the notice)") == 1
    assert run.keys("runs/stale-twice/notices/") == [f"runs/stale-twice/notices/checkpoint-stale-{_epoch(deadline)}"]


def test_a_notice_marker_that_cannot_be_read_gives_one_notice_for_the_attempt_not_one_per_sync(make_run):
    run = make_run(run_id="stale-unread", checkpoint_sync_seconds=1, extra_env="EPOCHS=400\nSTEP_SECONDS=0.3")
    run.proxy.refuse_s3_reads_matching = "notices"  # listing runs/<id>/notices/ answers 403
    stale_then_reclaimed(run, syncs_after=3)

    stale = [s for s in alert_subjects(run) if s == "training-infra run stale-unread: checkpoints are not reaching S3"]
    assert len(stale) == 1, "unknown whether the run was told: this attempt tells it, once"
    assert run.setup_log.count("cannot tell whether the run was told of checkpoint-stale (") == 1
    assert "AccessDenied" in run.setup_log.split("cannot tell whether the run was told", 1)[1].splitlines()[0]
    assert run.training_log.count("uploads are failing (said once; notice sent)") == 1
    assert run.status()["outcome"] == "interrupted", "the agent carried on until the reclaim"


def _epoch(iso: str) -> int:
    return calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))


def manifest_in_s3(run) -> dict:
    return json.loads(run.read(f"checkpoints/{run.run_id}/_manifest.json"))


def kill_the_box_mid_upload_of(run, key_part: str) -> dict:
    """Once a manifest is in S3, hang the uploads of `key_part` (a slow link), kill every process of the
    box while one hangs (nothing finalizes), and return the manifest S3 holds at that moment."""
    assert run.wait_for_s3(f"checkpoints/{run.run_id}/_manifest.json", timeout=60), run.setup_log
    deadline = time.monotonic() + 120
    while not manifest_in_s3(run)["files"]:
        assert time.monotonic() < deadline, f"no sync completed with a checkpoint in it:\n{run.setup_log}"
        time.sleep(0.2)
    run.proxy.hold_s3_writes_under = key_part
    assert run.proxy.held.wait(timeout=60), "an upload of the next checkpoint started"
    return manifest_in_s3(run)


def next_attempt_on_a_fresh_box(run, extra_env: str) -> None:
    run.kill_box()
    run.proxy.hold_s3_writes_under = ""
    run.proxy.release.set()
    shutil.rmtree(run.root)
    run.imds.set_tag("training-infra:attempt", "2")
    run.config = dataclasses.replace(run.config, extra_env=extra_env)
    run.run()


def test_a_box_killed_mid_upload_of_a_rotated_checkpoint_resumes_from_the_last_complete_one(make_run):
    """KEEP_CHECKPOINTS=1: each save deletes the previous checkpoint on disk. Before, the same sync that
    uploaded the new one deleted the old one from S3, so a box killed in between had no complete set,
    and a save during an upload left the manifest empty."""
    run = make_run(
        run_id="torn-rotated",
        checkpoint_sync_seconds=1,  # a save every 4 s: many uploads see one rotate a checkpoint away
        extra_env="EPOCHS=400\nSTEP_SECONDS=0.2\nCHECKPOINT_EVERY=20\nKEEP_CHECKPOINTS=1",
    ).start()
    last_complete = kill_the_box_mid_upload_of(run, "/ckpt-")
    name = max(last_complete["files"])  # the newest (a sync between the save and its rotation holds two)
    next_attempt_on_a_fresh_box(run, "EPOCHS=400\nSTEP_SECONDS=0.01\nCHECKPOINT_EVERY=20\nKEEP_CHECKPOINTS=1")

    assert run.attempt_status(2)["outcome"] == "succeeded", run.setup_log
    epoch = int(name.removeprefix("ckpt-").removesuffix(".npz"))
    assert f"resumed from checkpoint {name} (epoch {epoch})" in run.training_log, run.setup_log


SHARDED_TRAINER = """
import os, pathlib, sys, time
folder = pathlib.Path(os.environ["CHECKPOINT_DIR"])
model, optim = folder / "model.bin", folder / "optim.bin"
start = 0
if model.exists():
    start = int(model.read_text())
    print(f"resumed model={model.read_text().strip()} optim={optim.read_text().strip()}", flush=True)
for epoch in range(start + 1, start + int(os.environ["EPOCHS"]) + 1):
    model.write_text(f"{epoch}\\n")  # two shards rewritten under the same names on every save
    optim.write_text(f"{epoch}\\n")
    print(f"epoch {epoch}", flush=True)
    time.sleep(float(os.environ["STEP_SECONDS"]))
"""


def test_a_box_killed_after_one_shard_of_a_rewritten_checkpoint_landed_restores_the_matching_versions(
    make_run, tmp_path
):
    trainer = tmp_path / "sharded_trainer.py"
    trainer.write_text(SHARDED_TRAINER)
    run = make_run(
        run_id="torn-shards",
        checkpoint_sync_seconds=1,
        training_command=f"{sys.executable} {trainer}",
        extra_env="EPOCHS=400\nSTEP_SECONDS=3",
    ).start()
    last_complete = kill_the_box_mid_upload_of(run, "/optim.bin")
    recorded = last_complete["files"]["model.bin"]["version_id"]
    model = "checkpoints/torn-shards/model.bin"
    deadline = time.monotonic() + 30
    while run.s3.head_object(Bucket=run.config.outputs_bucket, Key=model)["VersionId"] == recorded:
        assert time.monotonic() < deadline, "the new model shard landed while the optimizer shard hung"
        time.sleep(0.2)
    saved = int(run.s3.get_object(Bucket=run.config.outputs_bucket, Key=model, VersionId=recorded)["Body"].read())
    next_attempt_on_a_fresh_box(run, "EPOCHS=2\nSTEP_SECONDS=0.1")

    assert run.attempt_status(2)["outcome"] == "succeeded", run.setup_log
    assert f"resumed model={saved} optim={saved}" in run.training_log, "both shards of one save, not a mix"
    assert "(1 by their recorded version: a later upload was cut short)" in run.setup_log


def test_a_manifest_whose_recorded_version_expired_fails_the_attempt_in_one_line_instead_of_mixing_saves(
    make_run,
):
    run = make_run(run_id="gone-version")
    bucket, prefix = run.config.outputs_bucket, "checkpoints/gone-version/"
    run.s3.put_object(Bucket=bucket, Key=prefix + "model.bin", Body=b"7\n")
    current = run.s3.put_object(Bucket=bucket, Key=prefix + "model.bin", Body=b"8\n")["VersionId"]
    run.s3.delete_object(Bucket=bucket, Key=prefix + "model.bin", VersionId=current)  # as the lifecycle rule does
    versions = run.s3.list_object_versions(Bucket=bucket, Prefix=prefix)["Versions"]
    gone = {"version_id": current, "etag": versions[0]["ETag"], "size": 2}
    manifest = {"files": {"model.bin": gone}, "written_at": "2026-11-27T10:00:00Z"}
    run.s3.put_object(Bucket=bucket, Key=prefix + "_manifest.json", Body=json.dumps(manifest).encode())
    run.run()

    status = run.status()
    assert status["outcome"] == "failed"
    assert "checkpoint model.bin: the version the last complete sync recorded is gone" in status["message"]
    assert "delete s3://" in status["message"] and "gone-version/_manifest.json and relaunch" in status["message"]
    assert "checkpoint restore failed (attempt" not in run.setup_log, "a gone version is not retried"


def test_a_fifo_heartbeat_fed_for_ever_is_no_beat_and_the_run_ends_as_usual(make_run):
    """A whole-file read of a FIFO fed for ever ran the old agent out of memory in 0.6 s."""
    feed = (
        'mkfifo "$HEARTBEAT_FILE"; (while :; do yes beat >"$HEARTBEAT_FILE" 2>/dev/null; done) & feeder=$!; '
        "sleep 6; kill $feeder; echo trainer done"
    )
    run = make_run(run_id="fifo-beat", stall_seconds=3, training_command=feed)
    run.run(timeout=90)

    status = run.status()
    assert status["outcome"] == "succeeded", run.setup_log
    assert status["progress"] is None, "a FIFO is not a regular file: no beat, so no stall either"
    assert "MemoryError" not in run.setup_log and "Traceback" not in run.setup_log


def test_a_sparse_ten_gigabyte_heartbeat_is_read_to_64_kb_and_counts_as_a_touch(make_run):
    beats = (
        'for i in 1 2 3 4 5 6; do printf \'{"step": %s}\' "$i" >"$HEARTBEAT_FILE"; '
        'truncate -s 10G "$HEARTBEAT_FILE"; sleep 1; done'
    )
    run = make_run(run_id="sparse-beat", stall_seconds=3, training_command=beats)
    run.run(timeout=90)

    status = run.status()
    assert status["outcome"] == "succeeded", "each rewrite is a touch: no stall over 6 s with a 3 s limit"
    assert status["progress"]["step"] is None, "64 KB of a JSON step and NULs is not JSON: a touch"
    assert run.setup_log.count("is not JSON: counted as a touch") == 1
