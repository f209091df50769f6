"""`logs` (CloudWatch stream per run, following) and `connect` (SSM Session Manager)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from training_infra import naming


def _put_lines(stacks, run_id: str, lines: list[str]) -> None:
    logs = stacks.client("logs")
    group = stacks.outputs[naming.OUTPUT_LOG_GROUP_NAME]
    with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_stream(logGroupName=group, logStreamName=run_id)
    now_ms = int(time.time() * 1000)
    logs.put_log_events(
        logGroupName=group,
        logStreamName=run_id,
        logEvents=[{"timestamp": now_ms + i, "message": m} for i, m in enumerate(lines)],
    )


def test_logs_prints_the_runs_stream_in_order(stacks):
    stacks.put_status({"run_id": "logs-done", "outcome": "succeeded"})
    lines = [f"epoch {i} loss {1 / (i + 1):.3f}" for i in range(30)]
    _put_lines(stacks, "logs-done", lines)

    result = stacks.cli("logs", "logs-done")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == lines


def _supervisor_sees_the_end(stacks, instance_id: str) -> None:
    """The instance's state-change event, handed to the supervisor's real handler (the local AWS runs no Lambda)."""
    from training_infra import naming
    from training_infra.cli.launching import supervisor_with
    from training_infra.local.events import STATE_CHANGE, ec2_event

    supervisor = supervisor_with(
        stacks.client, table=stacks.outputs[naming.OUTPUT_RUN_TABLE], outputs_bucket=stacks.outputs_bucket
    )
    supervisor.handle(ec2_event(STATE_CHANGE, instance_id, region=stacks.region, state="terminated"))


def test_logs_follow_prints_new_lines_until_the_run_ends(stacks, tmp_path):
    assert stacks.cli("launch", "--run-id", "logs-follow").exit_code == 0
    _put_lines(stacks, "logs-follow", ["booting"])
    env = {**os.environ, **stacks.env}
    follower = subprocess.Popen(
        [sys.executable, "-m", "training_infra", "logs", "logs-follow", "-f"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout.readline() == "booting\n"
        _put_lines(stacks, "logs-follow", ["epoch 1", "epoch 2"])
        assert follower.stdout.readline() == "epoch 1\n"
        [instance] = stacks.run_instances("logs-follow")
        _put_lines(stacks, "logs-follow", ["saving outputs"])
        stacks.client("ec2").terminate_instances(InstanceIds=[instance["InstanceId"]])
        _supervisor_sees_the_end(stacks, instance["InstanceId"])  # what EventBridge and the Lambda do on AWS
        follower.wait(timeout=30)
        rest, errors = follower.stdout.read(), follower.stderr.read()
    finally:
        follower.kill()
        follower.stdout.close()
        follower.stderr.close()
    assert follower.returncode == 0, errors
    assert rest.splitlines() == ["epoch 2", "saving outputs"]


def test_logs_of_an_unknown_run_says_so(stacks):
    result = stacks.cli("logs", "logs-nobody")

    assert result.exit_code == 1
    assert "unknown run 'logs-nobody'" in result.stderr


def test_logs_of_a_run_that_has_not_logged_yet_says_so(stacks):
    assert stacks.cli("launch", "--run-id", "logs-quiet").exit_code == 0

    result = stacks.cli("logs", "logs-quiet")

    assert result.exit_code == 1
    assert "no log lines for run logs-quiet yet" in result.stderr


def _fake_tools(bin_dir: Path, *, plugin: bool) -> Path:
    """A recording `aws` (and optionally the plugin): no SSM agent can answer here."""
    bin_dir.mkdir()
    record = bin_dir / "aws-args"
    (bin_dir / "aws").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    (bin_dir / "aws").chmod(0o755)
    if plugin:
        (bin_dir / "session-manager-plugin").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "session-manager-plugin").chmod(0o755)
    return record


def test_connect_opens_an_ssm_session_to_the_runs_instance(stacks, tmp_path):
    assert stacks.cli("launch", "--run-id", "connect-me").exit_code == 0
    [instance] = stacks.run_instances("connect-me")
    record = _fake_tools(tmp_path / "bin", plugin=True)

    result = stacks.cli("connect", "connect-me", env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"})

    assert result.exit_code == 0, result.output
    assert record.read_text().split() == [
        "ssm",
        "start-session",
        "--target",
        instance["InstanceId"],
        "--region",
        stacks.region,
    ]


def test_connect_without_the_plugin_prints_the_exact_command_and_how_to_install_it(stacks, tmp_path):
    assert stacks.cli("launch", "--run-id", "connect-noplugin").exit_code == 0
    [instance] = stacks.run_instances("connect-noplugin")
    record = _fake_tools(tmp_path / "bin", plugin=False)

    result = stacks.cli("connect", "connect-noplugin", env={"PATH": str(tmp_path / "bin")})

    assert result.exit_code == 1
    assert result.stdout == f"aws ssm start-session --target {instance['InstanceId']} --region {stacks.region}\n"
    assert "Session Manager plugin is not installed" in result.stderr
    assert "session-manager-working-with-install-plugin" in result.stderr
    assert not record.exists()


def test_connect_to_a_run_without_a_running_instance_says_so(stacks):
    stacks.put_status({"run_id": "connect-done", "outcome": "succeeded"})

    result = stacks.cli("connect", "connect-done")

    assert result.exit_code == 1
    assert "run connect-done has no running instance (finished)" in result.stderr
