"""Issue 27's smaller problems, each fixed or refused in one line (fetch into a file, a made-up region,
an empty log stream, both market flags, an empty upload, tiny dollar figures, `fetch latest` before
any success, a zero monthly limit, half a deployment, Ctrl-C during upload)."""

from __future__ import annotations

import contextlib

from training_infra import naming
from training_infra.cli import transfer


def test_fetch_into_an_existing_file_names_the_argument_not_a_path_inside_it(stacks, tmp_path):
    target = tmp_path / "hostname"
    target.write_text("box\n")

    message = stacks.usage_error("fetch", "small-fetch-file", str(target))

    assert message == f"error: argument 'DEST': got {str(target)!r}; allowed: a folder (new or existing), not a file\n"
    assert "/attempts/" not in message and target.read_text() == "box\n"


def test_a_region_that_is_no_region_name_is_a_usage_error_not_an_endpoint_complaint(stacks):
    message = stacks.usage_error("status", "--region", "mars-1")

    assert message == "error: option '--region': got 'mars-1'; allowed: an AWS region name such as us-east-1\n"


def test_logs_of_a_run_whose_stream_is_still_empty_is_an_error_not_silence(stacks):
    logs = stacks.client("logs")
    group = stacks.outputs[naming.OUTPUT_LOG_GROUP_NAME]
    with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_stream(logGroupName=group, logStreamName="small-logs-empty")
    stacks.put_status({"run_id": "small-logs-empty", "outcome": "succeeded"})

    result = stacks.cli("logs", "small-logs-empty")

    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: no log lines for run small-logs-empty yet (stream small-logs-empty in ")
    assert "`logs -f` waits for them" in result.stderr


def test_an_empty_folder_is_refused_by_upload_before_calling_aws(stacks, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)

    message = stacks.usage_error("upload", str(tmp_path / "empty"))

    assert "allowed: a file, or a folder with files in it (it is empty)" in message


def test_fetch_latest_before_any_success_says_what_latest_is_and_what_to_do(stacks):
    # The deployment is shared with other modules: a run another test let succeed left runs/latest/.
    s3 = stacks.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stacks.outputs_bucket, Prefix="runs/latest/"):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=stacks.outputs_bucket, Key=obj["Key"])
    stacks.put_status({"run_id": "small-stopped", "outcome": "stopped"})

    result = stacks.cli("fetch", "latest")

    assert result.exit_code == 1
    assert "no run has succeeded yet" in result.stderr and "fetch a run by its id" in result.stderr
    assert "no finished run" not in result.stderr


def test_outputs_says_a_zero_monthly_limit_is_no_limit(deployed):
    zero = deployed("eu-west-3", monthly_limit_usd="0")

    result = zero.cli("outputs")

    assert result.exit_code == 0, result.output
    assert "monthly_limit_usd = 0  (no monthly limit)" in result.stdout.splitlines()
    assert zero.cli("outputs", "monthly_limit_usd").stdout == "0\n", "the bare value stays bare for scripts"


def test_outputs_with_half_the_stacks_deployed_prints_what_exists_and_exits_1(stacks, monkeypatch):
    monkeypatch.setattr(naming, "ALL_STACKS", (*naming.ALL_STACKS, "TrainingInfraNotDeployedHere"))

    result = stacks.cli("outputs")

    assert result.exit_code == 1
    assert f"training_bucket = {stacks.data_bucket}" in result.stdout
    assert result.stderr == (
        f"error: 1 of {len(naming.ALL_STACKS)} stacks not deployed in us-east-1 (TrainingInfraNotDeployedHere): "
        "run `make deploy`\n"
    )


def test_ctrl_c_during_upload_says_how_much_got_there_and_that_a_rerun_resumes(stacks, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        (data / name).write_bytes(name.encode() * 100)
    real_upload = transfer.create_transfer_manager

    class Interrupting:
        """The real transfer manager; Ctrl-C arrives while the second file's upload is awaited."""

        def __init__(self, client, config) -> None:
            self.manager, self.calls = real_upload(client, config), 0

        def __enter__(self):
            self.manager.__enter__()
            return self

        def __exit__(self, *exc):
            return self.manager.__exit__(*exc)

        def upload(self, *args, **kwargs):
            future = self.manager.upload(*args, **kwargs)
            self.calls += 1
            if self.calls == 2:
                future.result = _interrupt
            return future

    def _interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(transfer, "create_transfer_manager", Interrupting)

    result = stacks.cli("upload", str(data))

    assert result.exit_code == 130
    assert result.stderr == (
        "error: interrupted: uploaded 1 of 3 file(s), 500 of 1,500 bytes; run the same upload again to resume "
        "(files already in the bucket are skipped)\n"
    )
