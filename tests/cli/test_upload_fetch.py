"""`upload` and `fetch`: the dataset into data/, a run's results back, unchanged files skipped."""

from __future__ import annotations

import os
from pathlib import Path

from training_infra import naming
from training_infra.cli.transfer import TRANSFER_CONFIG


def _bucket_keys(stacks, bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = stacks.client("s3")
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}


def _dataset(root: Path) -> dict[str, bytes]:
    files = {
        "train.csv": b"x,y\n1,2\n3,4\n",
        "nested/deeper/val.csv": b"x,y\n5,6\n",
        ".hidden-manifest": b"v1\n",
        # Above the multipart threshold: uploaded in parts, and its multipart ETag must still match.
        "shards/big.bin": os.urandom(TRANSFER_CONFIG.multipart_threshold + 1024 * 1024),
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return files


def test_upload_syncs_a_directory_to_the_data_prefix_then_moves_only_what_changed(deployed, tmp_path):
    stacks = deployed("us-west-2", empty_data=True)  # its own data bucket: the listing below is exact
    files = _dataset(tmp_path / "dataset")

    first = stacks.cli("upload", str(tmp_path / "dataset"))

    assert first.exit_code == 0, first.output
    assert _bucket_keys(stacks, stacks.data_bucket, naming.DATA_PREFIX) == {
        naming.DATA_PREFIX + k: v for k, v in files.items()
    }
    assert "uploaded 4 file(s)" in first.stdout and "skipped 0 unchanged" in first.stdout

    second = stacks.cli("upload", str(tmp_path / "dataset"))
    assert second.exit_code == 0, second.output
    assert "uploaded 0 file(s), 0 bytes; skipped 4 unchanged" in second.stdout

    (tmp_path / "dataset" / "train.csv").write_bytes(b"x,y\n1,2\n3,4\n7,8\n")
    third = stacks.cli("upload", str(tmp_path / "dataset"))
    assert "uploaded 1 file(s)" in third.stdout and "skipped 3 unchanged" in third.stdout
    assert _bucket_keys(stacks, stacks.data_bucket, naming.DATA_PREFIX + "train.csv")[
        naming.DATA_PREFIX + "train.csv"
    ].endswith(b"7,8\n")


def test_upload_of_a_single_file_puts_it_under_data(stacks, tmp_path):
    single = tmp_path / "labels-upload-single.json"
    single.write_text('{"a": 1}')

    result = stacks.cli("upload", str(single))

    assert result.exit_code == 0, result.output
    keys = _bucket_keys(stacks, stacks.data_bucket, naming.DATA_PREFIX + single.name)
    assert keys == {naming.DATA_PREFIX + single.name: b'{"a": 1}'}


def _put_run(stacks, prefix: str, files: dict[str, bytes]) -> None:
    for name, body in files.items():
        stacks.client("s3").put_object(Bucket=stacks.outputs_bucket, Key=prefix + name, Body=body)


RUN_FILES = {
    "outputs/model.bin": b"\x00weights\x01",
    "outputs/metrics/history.json": b'{"loss": [1.0, 0.5]}',
    "logs/training.log": b"epoch 1\nepoch 2\n",
    "status.json": b'{"run_id": "fetch-done", "outcome": "succeeded"}',
}


def test_fetch_downloads_a_runs_outputs_logs_and_status(stacks, tmp_path):
    _put_run(stacks, f"{naming.RUNS_PREFIX}fetch-done/", RUN_FILES)

    result = stacks.cli("fetch", "fetch-done", str(tmp_path / "got"))

    assert result.exit_code == 0, result.output
    fetched = {
        p.relative_to(tmp_path / "got").as_posix(): p.read_bytes() for p in (tmp_path / "got").rglob("*") if p.is_file()
    }
    assert fetched == RUN_FILES
    assert "fetched 4 file(s)" in result.stdout


def test_fetch_latest_reads_the_runs_latest_prefix(stacks, tmp_path):
    _put_run(stacks, naming.LATEST_PREFIX, {"outputs/model.bin": b"latest weights"})

    result = stacks.cli("fetch", "latest", str(tmp_path / "latest"))

    assert result.exit_code == 0, result.output
    assert (tmp_path / "latest" / "outputs" / "model.bin").read_bytes() == b"latest weights"


def test_fetch_defaults_to_runs_slash_run_id_in_the_current_folder(stacks, tmp_path, monkeypatch):
    _put_run(stacks, f"{naming.RUNS_PREFIX}fetch-default/", {"outputs/a.txt": b"a"})
    monkeypatch.chdir(tmp_path)

    result = stacks.cli("fetch", "fetch-default")

    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "fetch-default" / "outputs" / "a.txt").read_bytes() == b"a"


def test_fetch_never_writes_outside_dest_for_keys_with_dot_dot(stacks, tmp_path):
    _put_run(stacks, f"{naming.RUNS_PREFIX}fetch-evil/", {"outputs/ok.txt": b"ok", "../../../escaped.txt": b"no"})
    assert f"{naming.RUNS_PREFIX}fetch-evil/../../../escaped.txt" in _bucket_keys(
        stacks, stacks.outputs_bucket, f"{naming.RUNS_PREFIX}fetch-evil/"
    )

    result = stacks.cli("fetch", "fetch-evil", str(tmp_path / "dest" / "inner"))

    assert result.exit_code == 0, result.output
    assert (tmp_path / "dest" / "inner" / "outputs" / "ok.txt").read_bytes() == b"ok"
    assert not list(tmp_path.rglob("escaped.txt"))
    assert "skipped s3://" in result.output and "fetch-evil/../../../escaped.txt" in result.output


def test_fetch_never_writes_through_a_symlinked_folder_in_dest(stacks, tmp_path):
    """A folder of dest that is a symlink (planted, or left by an earlier tool) would carry the write elsewhere."""
    _put_run(stacks, f"{naming.RUNS_PREFIX}fetch-link/", {"outputs/model.bin": b"weights", "logs/a.log": b"log"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "outputs").symlink_to(elsewhere, target_is_directory=True)

    result = stacks.cli("fetch", "fetch-link", str(dest))

    assert result.exit_code == 0, result.output
    assert not list(elsewhere.iterdir())
    assert (dest / "logs" / "a.log").read_bytes() == b"log"
    assert "fetch-link/outputs/model.bin" in result.output and "symlink" in result.output


def test_fetch_of_a_running_run_says_results_come_at_the_end(stacks, tmp_path):
    assert stacks.cli("launch", "--run-id", "fetch-running").exit_code == 0

    result = stacks.cli("fetch", "fetch-running", str(tmp_path / "x"))

    assert result.exit_code == 1
    assert "run fetch-running has no results yet (running)" in result.stderr


def test_fetch_of_an_unknown_run_says_so(stacks, tmp_path):
    result = stacks.cli("fetch", "fetch-nobody", str(tmp_path / "x"))

    assert result.exit_code == 1
    assert "unknown run 'fetch-nobody'" in result.stderr
    assert not (tmp_path / "x").exists()


def test_upload_of_an_unreadable_file_is_one_line_naming_it(stacks, tmp_path):
    dataset = tmp_path / "broken"
    dataset.mkdir()
    (dataset / "ok.csv").write_text("x\n")
    dangling = dataset / "gone.bin"
    dangling.symlink_to(tmp_path / "deleted-target")  # listed, but cannot be read (also as root)

    result = stacks.cli("upload", str(dataset))

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert str(dangling) in result.stderr
    assert result.stderr.count("\n") == 1


def test_fetch_of_a_failed_run_fetches_and_says_it_failed(stacks, tmp_path):
    """Issue 14: the files are wanted (exit 0), but nobody should mistake them for a finished model."""
    failed = {
        **RUN_FILES,
        "status.json": (
            b'{"run_id": "fetch-failed", "outcome": "failed", "exit_code": 3, "message": "trainer exited 3"}'
        ),
    }
    _put_run(stacks, f"{naming.RUNS_PREFIX}fetch-failed/", failed)

    result = stacks.cli("fetch", "fetch-failed", str(tmp_path / "got"))

    assert result.exit_code == 0, result.output
    assert (tmp_path / "got" / "outputs" / "model.bin").read_bytes() == RUN_FILES["outputs/model.bin"]
    assert result.stderr == (
        "note: run fetch-failed ended failed (exit 3): trainer exited 3; "
        f"these are the files it left, see {tmp_path / 'got' / 'logs'}\n"
    )


def test_fetch_of_a_run_still_running_with_some_files_says_they_are_partial(stacks, tmp_path):
    assert stacks.cli("launch", "--run-id", "fetch-partial").exit_code == 0
    _put_run(stacks, f"{naming.RUNS_PREFIX}fetch-partial/", {"logs/training.log": b"epoch 1\n"})
    [instance] = stacks.run_instances("fetch-partial")

    result = stacks.cli("fetch", "fetch-partial", str(tmp_path / "got"))

    assert result.exit_code == 0, result.output
    assert (
        f"note: run fetch-partial (attempt 1) is still running on {instance['InstanceId']}: "
        "these are only the files uploaded so far"
    ) in result.stderr


def test_fetch_of_a_succeeded_run_adds_no_note(stacks, tmp_path):
    _put_run(
        stacks,
        f"{naming.RUNS_PREFIX}fetch-quiet/",
        {**RUN_FILES, "status.json": b'{"run_id": "fetch-quiet", "outcome": "succeeded"}'},
    )

    result = stacks.cli("fetch", "fetch-quiet", str(tmp_path / "got"))

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
