"""Issue 12 on the box: the trainer's progress beats, stalls, diagnostics and what status.json says.

The real agent (process runtime, the example trainer) against moto and a fake IMDS: a trainer that
hangs at full GPU is stopped as `stalled` after diagnostics, one that never beats is not judged, a
heartbeat that is not JSON counts as a touch, and the step, its rate and the time it last changed
reach status.json, the attempt's progress.json and CloudWatch (namespace TrainingInfra, RunId).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time

import pytest

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
    assert status["message"].startswith("no progress in /run/training-infra/progress/heartbeat.json for ")
    assert status["message"].endswith("s (last step 3)")
    assert status["progress"]["step"] == 3 and set(status["progress"]) == PROGRESS_KEYS
    assert status["exit_code"] == 137, "the hung trainer ignored SIGTERM and was killed after the grace period"
    training_log = run.read(run.log_key("training.log"))
    assert "outcome stalled" in training_log and "SIGKILL" in training_log, "the graceful stop, then the kill"
    diagnostics = run.read(run.log_key("training-diagnostics.txt"))
    for section in ("process tree", "the trainer's last 200 log lines", "py-spy"):
        assert section in diagnostics, section
    assert "train.py" in diagnostics.split("process tree", 1)[1], "the trainer is in the process tree"
    assert "\n100\n" in diagnostics, "nvidia-smi's output (the fake's)"
    assert "simulating a hang" in diagnostics, "the trainer's own last lines"
    assert {"Progress", "TrainingStep"} <= metric_names(run)
    assert run.called("poweroff")


def test_a_trainer_that_never_reports_progress_is_not_judged_by_it(make_run):
    run = make_run(run_id="silent-run", stall_seconds=1, training_command="sleep 6")
    run.run()

    status = run.status()
    assert status["outcome"] == "succeeded", run.setup_log
    assert status["progress"] is None, "status says progress is not reported"
    assert "Progress" not in metric_names(run)


def test_a_heartbeat_that_is_not_json_counts_as_a_touch_and_is_logged_once(make_run):
    writes = 'for i in 1 2 3 4 5 6; do echo "beat $i {" > "$HEARTBEAT_FILE"; sleep 1; done'
    run = make_run(run_id="touch-run", stall_seconds=3, training_command=writes)
    run.run()

    status = run.status()
    assert status["outcome"] == "succeeded", "each write was a beat: no stall over 6 s with a 3 s limit"
    assert status["progress"]["step"] is None and status["progress"]["changed_at"]
    assert run.setup_log.count("is not JSON: counted as a touch") == 1


def test_json_beats_reach_status_progress_json_and_the_step_and_rate_metrics(make_run):
    # A look every second (stall_seconds under 30) and metrics at each look with progress (production:
    # at most once a minute), over 20 s of training.
    run = make_run(
        run_id="beats-run",
        stall_seconds=20,
        extra_env="EPOCHS=40\nSTEP_SECONDS=0.5",
        env={"TI_PROGRESS_METRIC_SECONDS": "1"},
    )
    run.run()

    status = run.status()
    assert status["outcome"] == "succeeded", run.setup_log
    progress = status["progress"]
    assert progress["step"] == 40 and 0 < progress["steps_per_second"] <= 2, "at most one epoch per 0.5 s"
    assert json.loads(run.read("runs/beats-run/attempts/1/progress.json")).keys() == PROGRESS_KEYS
    assert {"Progress", "TrainingStep", "StepsPerSecond"} <= metric_names(run)


@pytest.mark.parametrize("value", ["-1", "ten"], ids=["negative", "not-a-number"])
def test_a_bad_stall_setting_fails_with_one_line_before_any_network_call(make_run, value):
    run = make_run(run_id="bad-stall", stall_seconds=value).run(timeout=60)

    status = run.status()
    assert status["message"] == f"TI_STALL_SECONDS='{value}' is not allowed: use a whole number (seconds or a count)"
    assert run.imds.requests == []


# ---------------------------------------------------------------- checkpoints: freshness and the manifest


def test_s3_refusing_checkpoint_uploads_mid_run_gives_one_notice_and_training_goes_on(make_run):
    run = make_run(
        run_id="stale-ckpt",
        checkpoint_sync_seconds=2,
        extra_env="EPOCHS=150\nSTEP_SECONDS=0.3\nCHECKPOINT_EVERY=2",
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
    [name] = last_complete["files"]
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
