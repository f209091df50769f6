"""The real agent (rendered user data, run by bash) against moto and a fake IMDS, end to end.

Each test is one way a real run ends; each asserts what a user relies on afterwards: what is in S3,
what status.json says, and that the box was powered off (or deliberately left running).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

LONG_TRAINING = "EPOCHS=400\nSTEP_SECONDS=0.2\nCHECKPOINT_EVERY=5"


def s3_writes(run, prefix: str) -> list[str]:
    """Object keys under `prefix` in the order the agent's successful PUTs reached S3."""
    keys = []
    for request in run.proxy.requests:
        path = request.path.split("?", 1)[0]
        if request.service == "s3" and request.method == "PUT" and request.status == 200:
            key = path.split("/", 2)[2] if path.count("/") >= 2 else ""
            if key.startswith(prefix):
                keys.append(key)
    return keys


def test_happy_path_syncs_checkpoints_while_training_then_uploads_everything_with_success_marker_last(make_run):
    # Every checkpoint kept: under load one sync can outlast a rotated checkpoint's 3.6 s of life, and a set
    # whose file vanished before the upload read it keeps the previous manifest, which after 2 such syncs is
    # (rightly) a freshness notice; rotation has its own tests (test_agent_progress.py).
    training = "EPOCHS=20\nSTEP_SECONDS=0.4\nKEEP_CHECKPOINTS=20"
    run = make_run(run_id="", checkpoint_sync_seconds=2, extra_env=training).start()
    run.wait_for_log(r"checkpoint ckpt-000003")
    synced_early = run.wait_for_s3("checkpoints/", timeout=20)
    assert run.process.poll() is None and synced_early, "checkpoints reach S3 while the trainer still runs"
    run.wait()

    assert re.fullmatch(r"\d{8}-\d{6}-i-[0-9a-f]+", run.run_id), "derived run id is <UTC date-time>-<instance id>"
    prefix = f"runs/{run.run_id}/"
    keys = run.keys(prefix)
    assert keys == [
        prefix + name
        for name in (
            "_SUCCESS",
            "attempts/1/cold_start.json",
            "attempts/1/logs/metrics.jsonl",  # the example trainer beats: watch's history rides the logs
            "attempts/1/logs/training-setup.log",
            "attempts/1/logs/training.log",
            "attempts/1/progress.json",
            "attempts/1/status.json",
            "outputs/metrics.json",
            "outputs/model.npz",
            "status.json",
        )
    ], "no attempt tag: the seed's single instance is attempt 1"
    assert s3_writes(run, prefix)[-1] == prefix + "_SUCCESS", "_SUCCESS must be the last object written"

    status = run.status()
    assert status == run.attempt_status(1), "the run's summary is its latest attempt's record"
    assert status["attempt"] == 1
    assert status["outcome"] == "succeeded" and status["exit_code"] == 0
    assert status["instance_id"] == run.imds.instance_id
    assert (status["instance_type"], status["market"], status["availability_zone"]) == (
        "g5.xlarge",
        "spot",
        "us-east-1a",
    )
    assert status["image"] == f"{run.config.image_uri}:v1"
    assert status["estimated_cost_usd"] == pytest.approx(1.006 * status["duration_seconds"] / 3600, abs=1e-4)
    for stamp in ("started_at", "ended_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", status[stamp])

    metrics = json.loads(run.read(prefix + "outputs/metrics.json"))
    assert metrics["epochs_completed"] == 20 and metrics["run_id"] == run.run_id, "trainer got RUN_ID and TI_EXTRA_ENV"
    assert "epoch 20/20" in run.read(run.log_key("training.log"))
    assert json.loads(run.read("runs/latest/status.json"))["run_id"] == run.run_id
    assert "runs/latest/_SUCCESS" in run.keys("runs/latest/")

    logs = run.extra["session"].client("logs", endpoint_url=run.aws.endpoint)
    events = logs.get_log_events(logGroupName=run.config.log_group, logStreamName=run.run_id)["events"]
    assert any("epoch 20/20" in event["message"] for event in events), (
        "training output streams to CloudWatch under the run id"
    )
    assert events[0]["message"].endswith("[training-infra] attempt 1 started on g5.xlarge in us-east-1a (spot)"), (
        "the attempt's first line in the run's stream says where it runs"
    )

    cloudwatch = run.extra["session"].client("cloudwatch", endpoint_url=run.aws.endpoint)
    gpu = cloudwatch.list_metrics(Namespace="TrainingInfra", MetricName="GPUUtilization")["Metrics"]
    assert {"Name": "InstanceId", "Value": run.imds.instance_id} in [d for m in gpu for d in m["Dimensions"]]

    notice = run.extra["sqs"].receive_message(QueueUrl=run.extra["queue_url"], WaitTimeSeconds=2)["Messages"][0]
    assert run.run_id in json.loads(notice["Body"])["Message"] and "succeeded" in json.loads(notice["Body"])["Message"]

    shutdown_calls = [(at, call) for at, call in run.calls if call.startswith("shutdown")]
    assert shutdown_calls[0][1].startswith("shutdown -h +10 "), "OS deadline = max runtime rounded up to minutes"
    assert shutdown_calls[0][0] < min(r.at for r in run.imds.requests), "deadline is set before the first network call"
    assert run.called("poweroff") == ["poweroff "], "powered off exactly once, at the very end"


def test_spot_notice_sigterms_trainer_saves_checkpoint_and_records_interruption(make_run):
    run = make_run(run_id="spot-run", extra_env=LONG_TRAINING, checkpoint_sync_seconds=300).start()
    run.wait_for_log(r"epoch 3/")
    noticed_at = time.time()
    run.imds.inject_spot_interruption()
    run.wait(90)

    sigterm_at = float(run.wait_for_log(r"received SIGTERM at ([0-9.]+)").group(1))
    assert sigterm_at - noticed_at <= 6, "trainer gets SIGTERM within one poll of the notice"
    checkpoints = [key for key in run.keys("checkpoints/spot-run/") if "/ckpt-" in key]
    assert checkpoints, "the checkpoint written on SIGTERM reached S3 (periodic sync was off)"
    saved_epoch = int(checkpoints[-1].rsplit("-", 1)[1].split(".")[0])
    assert saved_epoch >= 3
    status = run.status()
    assert status["outcome"] == "interrupted" and "spot interruption" in status["message"]
    assert "runs/spot-run/_SUCCESS" not in run.keys("runs/spot-run/")
    assert "received SIGTERM" in run.read(run.log_key("training.log"))
    assert json.loads(run.read("runs/spot-run/outputs/metrics.json"))["interrupted"] is True
    assert run.called("poweroff")


def test_rebalance_with_stop_on_rebalance_false_syncs_checkpoints_early_and_training_continues(make_run):
    run = make_run(
        run_id="rebalance-run",
        stop_on_rebalance=False,
        checkpoint_sync_seconds=300,
        extra_env="EPOCHS=40\nSTEP_SECONDS=0.5\nCHECKPOINT_EVERY=10",  # a save every 5 s
    ).start()
    run.wait_for_log(r"checkpoint ckpt-000010")
    noticed_at = time.monotonic()
    run.imds.inject_rebalance()
    run.wait_for_log(r"checkpoints synced after the rebalance recommendation", timeout=45)
    took = time.monotonic() - noticed_at
    assert took < 30, f"within seconds of the notice, not at the 300 s sync: {took:.1f} s\n{run.setup_log}"
    manifest = json.loads(run.read("checkpoints/rebalance-run/_manifest.json"))
    assert "ckpt-000010.npz" in manifest["files"], f"a set a reclaim could resume from: {manifest}\n{run.setup_log}"
    epoch_at_sync = max(int(epoch) for epoch in re.findall(r"epoch (\d+)/", run.training_log))
    run.wait_for_log(rf"epoch {epoch_at_sync + 3}/", timeout=30)  # the trainer keeps going
    run.wait()
    assert run.status()["outcome"] == "succeeded"


def test_a_spot_notice_during_a_slow_rebalance_sync_still_stops_the_trainer_within_one_poll(make_run):
    run = make_run(
        run_id="rebalance-slow", stop_on_rebalance=False, checkpoint_sync_seconds=300, extra_env=LONG_TRAINING
    ).start()
    run.wait_for_log(r"checkpoint ckpt-000005")
    run.proxy.hold_s3_writes_under = "/checkpoints/"  # the rebalance sync hangs on a slow link
    run.imds.inject_rebalance()
    assert run.proxy.held.wait(timeout=30), "the rebalance sync started uploading"
    noticed_at = time.time()
    run.imds.inject_spot_interruption()
    sigterm_at = float(run.wait_for_log(r"received SIGTERM at ([0-9.]+)").group(1))
    assert sigterm_at - noticed_at <= 6, "the notice is polled while the rebalance sync still runs"
    run.proxy.hold_s3_writes_under = ""
    run.proxy.release.set()
    run.wait(120)

    status = run.status()
    assert status["outcome"] == "interrupted" and "spot interruption" in status["message"]
    manifest = json.loads(run.read("checkpoints/rebalance-slow/_manifest.json"))
    saved_on_sigterm = re.findall(r"checkpoint (ckpt-\d+\.npz) \(on SIGTERM\)", run.training_log)
    assert saved_on_sigterm and saved_on_sigterm[-1] in manifest["files"], "finalize ran its own sync"


def test_agent_terminated_by_the_os_stops_trainer_with_grace_and_still_saves_everything(make_run):
    run = make_run(run_id="sigterm-run", extra_env=LONG_TRAINING, checkpoint_sync_seconds=300).start()
    run.wait_for_log(r"epoch 3/")
    os.killpg(run.process.pid, signal.SIGTERM)  # systemd at shutdown: the agent and its log pipe
    run.wait(90)

    status = run.status()
    assert status["outcome"] == "interrupted" and "SIGTERM" in status["message"]
    assert "received SIGTERM" in run.training_log, "the trainer was asked to stop, not killed"
    assert run.keys("checkpoints/sigterm-run/")
    assert "runs/sigterm-run/outputs/metrics.json" in run.keys("runs/sigterm-run/")
    assert run.called("poweroff")


def test_trainer_crash_reports_failed_with_exit_code_uploads_logs_and_no_success_marker(make_run):
    run = make_run(run_id="crash-run", extra_env="EPOCHS=6\nSTEP_SECONDS=0.2\nFAIL_AT_EPOCH=2").run()

    status = run.status()
    assert (status["outcome"], status["exit_code"]) == ("failed", 3)
    keys = run.keys("runs/crash-run/")
    assert "runs/crash-run/_SUCCESS" not in keys
    assert "simulated crash" in run.read(run.log_key("training.log"))
    assert "runs/latest/status.json" not in run.keys("runs/latest/"), "a failed run does not replace runs/latest/"
    assert run.called("poweroff")


def test_transient_s3_failures_are_retried_and_the_run_still_succeeds(make_run):
    run = make_run(run_id="flaky-run", fail_s3_every=3).run()

    assert run.proxy.injected_failures >= 5, "the proxy really failed S3 requests"
    assert run.status()["outcome"] == "succeeded"
    assert "runs/flaky-run/_SUCCESS" in run.keys("runs/flaky-run/")
    assert "runs/flaky-run/outputs/model.npz" in run.keys("runs/flaky-run/")


def test_missing_image_fails_the_run_clearly_after_bounded_retries_and_powers_off(make_run):
    run = make_run(run_id="no-image", with_image=False, env={"TI_RETRY_ATTEMPTS": "2"}).run()

    status = run.status()
    assert status["outcome"] == "failed" and status["exit_code"] is None
    assert "could not get image" in status["message"] and run.config.image_uri in status["message"]
    assert "ImageNotFoundException" in run.read(run.log_key("training-setup.log"))
    assert run.setup_log.count("failed (attempt 1 of 2)") == 1, "retried a bounded number of times"
    assert f"image {run.config.image_uri}:v1 failed after 2 attempts" in run.setup_log
    assert "starting trainer" not in run.setup_log
    assert run.called("poweroff")


def test_data_sync_failing_for_good_is_reported_and_auto_shutdown_false_leaves_box_running(make_run):
    run = make_run(run_id="no-data", with_data=False, auto_shutdown=False, env={"TI_RETRY_ATTEMPTS": "2"}).run()

    status = run.status()
    assert status["outcome"] == "failed"
    assert f"could not sync s3://{run.config.data_bucket}/data/" in status["message"]
    assert "NoSuchBucket" in run.read(run.log_key("training-setup.log"))
    assert run.called("poweroff") == []
    assert run.called("shutdown -h +"), "the OS deadline still guards a box left running"


def test_max_runtime_deadline_stops_trainer_and_saves_its_outputs(make_run):
    run = make_run(run_id="deadline-run", max_runtime_seconds=25, extra_env=LONG_TRAINING).run()

    status = run.status()
    assert status["outcome"] == "deadline" and "max runtime" in status["message"]
    assert 25 <= status["duration_seconds"] <= 45
    assert json.loads(run.read("runs/deadline-run/outputs/metrics.json"))["interrupted"] is True
    assert run.keys("checkpoints/deadline-run/")
    assert run.called("shutdown -h +1 "), "25 s rounds up to a 1-minute OS deadline"
    assert run.called("poweroff")


def test_idle_gpu_ends_the_run_as_idle_and_saves_outputs(make_run):
    run = make_run(run_id="idle-run", idle_seconds=3, idle_gpu_percent=5, extra_env=LONG_TRAINING)
    (run.tmp / "gpu-util").write_text("0\n3\n")  # two GPUs, both below 5 %
    run.run()

    status = run.status()
    assert status["outcome"] == "idle" and "GPU utilisation below 5" in status["message"]
    assert status["duration_seconds"] < 60, "well before the 80 s the trainer would take"
    assert "runs/idle-run/outputs/metrics.json" in run.keys("runs/idle-run/")
    assert run.called("poweroff")


def _checkpoint(epoch: int, weights: list[float]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, weights=np.array(weights), epoch=epoch)
    return buffer.getvalue()


def test_relaunch_with_same_run_id_restores_its_checkpoint_and_continues(make_run):
    run = make_run(run_id="resume-run", extra_env="EPOCHS=8\nSTEP_SECONDS=0.2")
    bucket = run.config.outputs_bucket
    run.s3.put_object(
        Bucket=bucket, Key="checkpoints/resume-run/ckpt-000005.npz", Body=_checkpoint(5, [1.5, -2.0, 0.5, 0.25])
    )
    # Another run's newer checkpoint must not leak into this one.
    run.s3.put_object(Bucket=bucket, Key="checkpoints/other-run/ckpt-000007.npz", Body=_checkpoint(7, [9, 9, 9, 9]))
    run.run()

    assert "resumed from checkpoint ckpt-000005.npz (epoch 5)" in run.training_log
    metrics = json.loads(run.read("runs/resume-run/outputs/metrics.json"))
    assert (metrics["resumed_from_epoch"], metrics["epochs_completed"]) == (5, 8)
    assert run.status()["outcome"] == "succeeded"
    local = sorted(p.name for p in (run.root / "checkpoints").glob("ckpt-*.npz"))
    assert run.keys("checkpoints/resume-run/") == [
        f"checkpoints/resume-run/{name}" for name in ["_manifest.json", *local]
    ], "S3 mirrors what the trainer kept, and the manifest names it"
    assert sorted(json.loads(run.read("checkpoints/resume-run/_manifest.json"))["files"]) == local
    assert "ckpt-000008.npz" in local


def test_bad_setting_fails_with_one_line_naming_it_before_any_network_call(make_run):
    run = make_run(run_id="bad-setting", env={"TI_RUNTIME": "podman"}).run()

    status = run.status()
    assert status["outcome"] == "failed"
    assert status["message"] == "TI_RUNTIME='podman' is not allowed: use one of docker process"
    assert not run.agent_called("shutdown"), "validation happens before anything else"
    assert run.imds.requests == [], "no metadata call either"
    assert run.called("poweroff")


FAKE_DOCKER = '''#!{python}
"""Stands in for the Docker CLI (no engine here): records each call; `run` acts as the container."""
import json, os, pathlib, signal, sys, time
state = pathlib.Path({state!r})
args = sys.argv[1:]
call = {{"argv": args}}
if args[0] == "login":
    call["stdin"] = sys.stdin.read()
with open(state / "docker-calls.jsonl", "a") as log:
    log.write(json.dumps(call) + "\\n")
if args[0] == "run":
    mounts = dict(reversed(args[i + 1].split(":")[:2]) for i, a in enumerate(args) if a == "-v")
    (state / "container.pid").write_text(str(os.getpid()))
    def stop(signum, frame):
        pathlib.Path(mounts["/outputs"], "result.txt").write_text("saved on SIGTERM")
        print("container got SIGTERM", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    print("container running", flush=True)
    time.sleep(120)
elif args[0] == "pull" and (state / "pull-stalls").exists():
    time.sleep(120)
elif args[0] == "stop":
    os.kill(int((state / "container.pid").read_text()), signal.SIGTERM)
'''


def use_fake_docker(run) -> None:
    fake = run.tmp / "bin" / "docker"
    fake.write_text(FAKE_DOCKER.format(python=sys.executable, state=str(run.tmp)))
    fake.chmod(0o755)
    run.env.update(TI_RUNTIME="docker", TI_DOCKER=str(fake))


def docker_calls(run) -> list[dict]:
    """The engine calls after `docker info` (the agent asks it first: lazy or plain pull, issue 29)."""
    calls = [json.loads(line) for line in (run.tmp / "docker-calls.jsonl").read_text().splitlines()]
    assert calls[0]["argv"] == ["info", "--format", "{{.Driver}}"]
    return [call for call in calls if call["argv"][0] != "info"]


def test_docker_runtime_pulls_from_ecr_runs_with_gpus_and_mounts_and_docker_stops_on_spot_notice(make_run):
    run = make_run(run_id="docker-run", training_command="python train.py --fast")
    use_fake_docker(run)
    run.start()
    run.wait_for_log("container running")
    run.imds.inject_spot_interruption()
    run.wait(90)

    calls = docker_calls(run)
    verbs = [call["argv"][0] for call in calls]
    assert verbs[:2] == ["login", "pull"] and "run" in verbs and verbs[-1] == "stop"
    registry = run.config.image_uri.split("/")[0]
    assert (
        calls[0]["argv"] == ["login", "--username", "AWS", "--password-stdin", registry] and calls[0]["stdin"].strip()
    )
    image = f"{run.config.image_uri}:v1"
    assert calls[1]["argv"][-1] == image
    argv = next(call["argv"] for call in calls if call["argv"][0] == "run")
    assert "--gpus" in argv and argv[argv.index("--gpus") + 1] == "all"
    root = run.root
    for mount in (f"{root}/data:/data:ro", f"{root}/outputs:/outputs", f"{root}/checkpoints:/checkpoints"):
        assert mount in argv
    assert "RUN_ID=docker-run" in argv and "CHECKPOINT_DIR=/checkpoints" in argv
    assert argv[argv.index(image) + 1 :] == ["sh", "-c", "python train.py --fast"]
    assert calls[-1]["argv"][:3] == ["stop", "-t", "10"]
    assert run.status()["outcome"] == "interrupted"
    assert run.read("runs/docker-run/outputs/result.txt") == "saved on SIGTERM"


def test_child_left_behind_by_a_finished_trainer_is_stopped_after_the_grace_period(make_run):
    run = make_run(run_id="leftover-run", stop_grace_seconds=2)
    marker = run.tmp / "leftover-stopped"
    leftover = run.tmp / "leftover.sh"
    leftover.write_text(f"#!/bin/bash\ntrap 'echo TERM > {marker}; exit 0' TERM\nsleep 300 & wait\n")
    leftover.chmod(0o755)
    # A background helper (a log shipper, a stray data-loader worker) shares the trainer's process group.
    run.config = dataclasses.replace(run.config, training_command=f"{leftover} & exec {run.config.training_command}")
    run.run(timeout=180)  # the uploads after the run take long on a loaded machine; the grace is asserted below

    status = run.status()
    assert (status["outcome"], status["exit_code"]) == ("succeeded", 0)
    assert marker.read_text() == "TERM\n", "the leftover child got SIGTERM instead of holding the run open"
    assert status["duration_seconds"] < 40, "the agent waited the grace period, not for the child"
    assert run.called("poweroff")


def test_stalled_docker_pull_is_cut_at_the_pull_timeout_and_retried_a_bounded_number_of_times(make_run):
    run = make_run(run_id="stalled-pull", env={"TI_RETRY_ATTEMPTS": "2", "TI_PULL_TIMEOUT_SECONDS": "2"})
    use_fake_docker(run)
    (run.tmp / "pull-stalls").touch()
    run.run(timeout=60)

    status = run.status()
    assert status["outcome"] == "failed" and "could not get image" in status["message"]
    assert [call["argv"][0] for call in docker_calls(run)] == ["login", "pull", "login", "pull"]
    assert run.setup_log.count("docker pull stalled: cut after 2s") == 2
    assert "starting trainer" not in run.setup_log
    assert run.called("poweroff")
