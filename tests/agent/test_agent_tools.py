"""agent_tools.py, the agent's Python helpers, as units: log batches for CloudWatch and status.json.

The scenario tests run the same file on the "instance" (unpacked from the user data); these pin the
edge cases a scenario rarely hits: partial lines, blank lines, batch limits, a trainer that never ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from training_infra.compute.agent import agent_tools
from training_infra.compute.user_data import AGENT_DIR

TOOLS = AGENT_DIR / "agent_tools.py"


def test_log_batch_holds_back_a_line_still_being_written_until_the_final_flush(tmp_path):
    log = tmp_path / "training.log"
    log.write_bytes(b"epoch 1\nepoch 2\nepoch 3 half")
    events, offset = agent_tools.next_log_batch(log, 0, final=False, now_ms=7)
    assert [e["message"] for e in events] == ["epoch 1", "epoch 2"] and offset == len(b"epoch 1\nepoch 2\n")
    assert {e["timestamp"] for e in events} == {7}
    assert agent_tools.next_log_batch(log, offset, final=False, now_ms=8) is None, "nothing complete yet"
    events, end = agent_tools.next_log_batch(log, offset, final=True, now_ms=9)
    assert [e["message"] for e in events] == ["epoch 3 half"] and end == log.stat().st_size


def test_log_batch_skips_blank_lines_but_consumes_their_bytes_and_replaces_bad_utf8(tmp_path):
    log = tmp_path / "training.log"
    log.write_bytes(b"\n   \nloss \xff\r\n\n")
    events, offset = agent_tools.next_log_batch(log, 0, final=False, now_ms=0)
    assert [e["message"] for e in events] == ["loss \ufffd"]
    assert offset == log.stat().st_size


def test_log_batch_stays_inside_cloudwatch_limits_for_many_and_long_lines(tmp_path):
    log = tmp_path / "training.log"
    log.write_bytes(b"x\n" * 12_000 + b"y" * 300_000 + b"\n")
    events, offset = agent_tools.next_log_batch(log, 0, final=False, now_ms=0)
    assert len(events) == agent_tools.BATCH_MAX_EVENTS and offset == 2 * agent_tools.BATCH_MAX_EVENTS
    offset = 2 * 12_000
    events, _ = agent_tools.next_log_batch(log, offset, final=True, now_ms=0)
    assert len(events) == 1 and len(events[0]["message"]) == agent_tools.EVENT_MAX_CHARS
    assert sum(len(e["message"].encode()) + 26 for e in events) < 1_048_576


def test_log_batch_command_commits_nothing_itself_and_ends_with_minus_one(tmp_path):
    """The agent moves OFFSET.next over OFFSET only after put-log-events worked: a failed upload is resent."""
    log, offset_file, batch_file = tmp_path / "training.log", tmp_path / "log.offset", tmp_path / "batch.json"
    log.write_text("a\nb\n")
    argv = [sys.executable, str(TOOLS), "log-batch", str(log), str(offset_file), str(batch_file)]
    assert subprocess.run(argv, capture_output=True, text=True, check=True).stdout == "2\n"
    assert [e["message"] for e in json.loads(batch_file.read_text())] == ["a", "b"]
    assert not offset_file.exists() and (tmp_path / "log.offset.next").read_text() == "4"
    (tmp_path / "log.offset.next").rename(offset_file)
    assert subprocess.run(argv, capture_output=True, text=True, check=True).stdout == "-1\n"


STATUS_ARGS = {
    "run-id": "r1",
    "attempt": "2",
    "outcome": "failed",
    "started-at": "2026-11-29T00:00:00Z",
    "ended-at": "2026-11-29T00:30:00Z",
    "duration-seconds": "1800",
    "instance-id": "i-0abc",
    "instance-type": "g5.xlarge",
    "market": "spot",
    "availability-zone": "us-east-1a",
    "hourly-price-usd": "1.006",
    "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/trainer:v1",
    "message": "-x: a message that looks like an option",
}


@pytest.mark.parametrize(("exit_code", "expected"), [("", None), ("0", 0), ("137", 137)])
def test_status_command_writes_the_documented_fields_and_prints_the_cost(tmp_path, exit_code, expected):
    path = tmp_path / "status.json"
    options = [f"--{name}={value}" for name, value in {**STATUS_ARGS, "exit-code": exit_code}.items()]
    printed = subprocess.run(
        [sys.executable, str(TOOLS), "status", str(path), *options], capture_output=True, text=True, check=True
    ).stdout
    status = json.loads(path.read_text())
    assert status["exit_code"] == expected, "empty means the trainer never started: null"
    assert status["estimated_cost_usd"] == 0.503 and printed == "0.503\n", "1.006 USD/h for half an hour"
    assert (status["duration_seconds"], status["hourly_price_usd"]) == (1800, 1.006)
    assert status["message"] == STATUS_ARGS["message"]
    assert status["attempt"] == 2, "the attempt number as a JSON number"
    assert list(status) == [
        "run_id", "attempt", "outcome", "exit_code", "started_at", "ended_at", "duration_seconds", "instance_id",
        "instance_type", "market", "availability_zone", "hourly_price_usd", "estimated_cost_usd", "image", "message",
        "progress",
    ]  # fmt: skip
    assert status["progress"] is None, "no --progress-file: the trainer never reported progress"


def test_status_command_refuses_a_missing_field_with_usage_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TOOLS), "status", str(tmp_path / "s.json"), "--run-id=r1"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "the following arguments are required" in result.stderr
    assert not (tmp_path / "s.json").exists()


def write_at(path, text: str, at: float) -> None:
    """Write `text` as the trainer would at time `at` (the file's modification time)."""
    path.write_text(text)
    os.utime(path, ns=(int(at * 1e9), int(at * 1e9)))


def test_progress_counts_a_changed_step_with_its_rate_and_a_rewrite_without_a_step_as_a_touch(tmp_path):
    beat, state = tmp_path / "heartbeat.json", tmp_path / "progress.state.json"
    assert agent_tools.observe_progress(beat, state, now=100) == {}, "no file yet: never reported"
    write_at(beat, '{"step": 10, "loss": 0.5}', at=100)
    assert agent_tools.observe_progress(beat, state, now=103)["changed_epoch"] == 100, "the write's time"
    write_at(beat, '{"step": 10}', at=104)  # written again, same step: a heartbeat thread is not progress
    assert agent_tools.observe_progress(beat, state, now=105)["changed_epoch"] == 100
    write_at(beat, '{"step": 30}', at=110)
    seen = agent_tools.observe_progress(beat, state, now=130)
    assert (seen["step"], seen["steps_per_second"], seen["changed_at"]) == (30, 2.0, "1970-01-01T00:01:50Z")
    record = {"step": 30, "steps_per_second": 2.0, "changed_at": "1970-01-01T00:01:50Z"}
    assert agent_tools.progress_record(seen) == record
    write_at(beat, "", at=120)  # a touch
    assert agent_tools.observe_progress(beat, state, now=140)["changed_epoch"] == 120
    assert agent_tools.observe_progress(beat, state, now=150)["changed_epoch"] == 120, "not written again"


def test_progress_takes_no_beat_from_a_file_written_before_the_trainer_started(tmp_path):
    beat, state = tmp_path / "heartbeat.json", tmp_path / "progress.state.json"
    write_at(beat, '{"step": 900}', at=40)  # restored with the checkpoints: the last attempt's time
    assert agent_tools.observe_progress(beat, state, now=500, since=100) == {}, "not reporting yet"
    argv = [sys.executable, str(TOOLS), "progress", str(beat), str(state), "500", "--since", "100"]
    assert subprocess.run(argv, capture_output=True, text=True, check=True).stdout == "none\n"
    write_at(beat, '{"step": 900}', at=120)  # the resumed trainer's first beat, at the step it resumed from
    seen = agent_tools.observe_progress(beat, state, now=500, since=100)
    assert (seen["step"], seen["changed_epoch"]) == (900, 120), "its first write after the start is a beat"
    write_at(beat, "", at=130)  # and touches after it count as before
    assert agent_tools.observe_progress(beat, state, now=500, since=100)["changed_epoch"] == 130


def test_progress_says_once_that_a_heartbeat_is_not_json_and_never_fails(tmp_path, capsys):
    beat, state = tmp_path / "heartbeat.json", tmp_path / "progress.state.json"
    for now, text in ((1, "{broken"), (2, "still [broken"), (3, '"a string"')):
        beat.write_text(text)
        assert agent_tools.observe_progress(beat, state, now=now)["step"] is None
    assert capsys.readouterr().err.count("is not JSON") == 1


def test_progress_command_prints_the_change_and_writes_the_public_record(tmp_path):
    beat, state = tmp_path / "heartbeat.json", tmp_path / "progress.state.json"
    argv = [sys.executable, str(TOOLS), "progress", str(beat), str(state)]
    assert subprocess.run([*argv, "50"], capture_output=True, text=True, check=True).stdout == "none\n"
    write_at(beat, '{"step": 7}', at=60)
    assert subprocess.run([*argv, "61"], capture_output=True, text=True, check=True).stdout == "60 7 -\n"
    assert json.loads((tmp_path / "progress.json").read_text()) == {
        "step": 7,
        "steps_per_second": None,
        "changed_at": "1970-01-01T00:01:00Z",
    }


def _newest(**sizes: int) -> dict[str, dict]:
    """What latest_versions gives for objects name=size, each at version v-<name>."""
    return {name: {"version_id": f"v-{name}", "etag": f'"{name}"', "size": size} for name, size in sizes.items()}


def test_manifest_names_the_files_the_upload_carried_with_their_s3_version_and_drops_only_the_rest(tmp_path):
    (tmp_path / "shard").mkdir()
    for name in ("ckpt-1.pt", "shard/part-0.pt", "ckpt-2.pt.tmp", "_manifest.json", "heartbeat.json"):
        (tmp_path / name).write_text(name)
    (tmp_path / "link.pt").symlink_to(tmp_path / "ckpt-1.pt")
    snapshot = agent_tools.checkpoint_files(tmp_path, skip="heartbeat.json")
    assert sorted(snapshot) == ["ckpt-1.pt", "shard/part-0.pt"], "no .tmp, symlink, manifest or heartbeat"
    (tmp_path / "ckpt-3.pt").write_text("new during the upload")
    latest = _newest(**{"ckpt-1.pt": 9, "shard/part-0.pt": 15, "ckpt-0.pt": 4})
    manifest, stale = agent_tools.commit_manifest(tmp_path, snapshot, latest, now=0, skip="heartbeat.json")
    assert manifest == {
        "files": {"ckpt-1.pt": latest["ckpt-1.pt"], "shard/part-0.pt": latest["shard/part-0.pt"]},
        "written_at": "1970-01-01T00:00:00Z",
    }
    assert stale == ["ckpt-0.pt"], "only what is neither in the manifest nor on disk"


def test_a_checkpoint_rotated_away_during_the_upload_stays_in_the_manifest_and_in_s3(tmp_path):
    (tmp_path / "ckpt-1.pt").write_text("12345")
    snapshot = agent_tools.checkpoint_files(tmp_path)
    (tmp_path / "ckpt-1.pt").unlink()  # the trainer saved ckpt-2 (not in this upload) and dropped ckpt-1
    (tmp_path / "ckpt-2.pt").write_text("67890")
    manifest, stale = agent_tools.commit_manifest(tmp_path, snapshot, _newest(**{"ckpt-1.pt": 5}), now=0)
    assert manifest is not None and list(manifest["files"]) == ["ckpt-1.pt"] and stale == []


def test_half_a_sharded_checkpoint_rotated_away_before_the_upload_read_it_keeps_the_previous_manifest(tmp_path):
    (tmp_path / "global_step1").mkdir()
    for name in ("global_step1/a.bin", "global_step1/b.bin"):
        (tmp_path / name).write_text("12345")
    snapshot = agent_tools.checkpoint_files(tmp_path)
    (tmp_path / "global_step1/b.bin").unlink()  # gone before the AWS CLI read it: never reached S3
    latest = _newest(**{"global_step1/a.bin": 5, "global_step0/a.bin": 5, "global_step0/b.bin": 5})
    manifest, moved = agent_tools.commit_manifest(tmp_path, snapshot, latest, now=0)
    assert (manifest, moved) == (None, ["global_step1/b.bin"]), "no half set, and global_step0 is not deleted"


def test_a_file_rewritten_during_the_upload_keeps_the_previous_manifest_and_deletes_nothing(tmp_path):
    for name in ("model.pt", "optim.pt", "old.pt"):
        (tmp_path / name).write_text("12345")
    snapshot = agent_tools.checkpoint_files(tmp_path)
    (tmp_path / "old.pt").unlink()
    (tmp_path / "optim.pt").write_text("half old, half new?")
    latest = _newest(**{"model.pt": 5, "optim.pt": 5, "old.pt": 5, "older.pt": 1})
    assert agent_tools.commit_manifest(tmp_path, snapshot, latest, now=0) == (None, ["optim.pt"])


def test_a_file_whose_newest_s3_version_is_not_the_uploaded_size_keeps_the_previous_manifest(tmp_path):
    (tmp_path / "model.pt").write_text("12345")
    snapshot = agent_tools.checkpoint_files(tmp_path)
    assert agent_tools.commit_manifest(tmp_path, snapshot, _newest(**{"model.pt": 3}), now=0) == (None, ["model.pt"])


def test_latest_versions_keeps_the_run_prefix_objects_without_the_manifest_and_reads_an_empty_listing():
    listing = [
        ["checkpoints/r1/a.pt", "v1", '"e1"', 3],
        ["checkpoints/r1/_manifest.json", "v2", '"e2"', 9],
        ["checkpoints/r10/b.pt", "v3", '"e3"', 4],
    ]
    assert agent_tools.latest_versions(listing, "checkpoints/r1/") == {
        "a.pt": {"version_id": "v1", "etag": '"e1"', "size": 3}
    }
    assert agent_tools.latest_versions(None, "checkpoints/r1/") == {}, "list-object-versions says null when empty"


def test_restore_takes_current_files_by_name_and_ones_a_cut_upload_replaced_by_their_recorded_version():
    manifest = {"files": _newest(**{"b.pt": 1, "a[1]*.pt": 2, "optim.pt": 3})}
    latest = _newest(**{"b.pt": 1, "a[1]*.pt": 2}) | {"optim.pt": {"version_id": "newer", "etag": '"x"', "size": 5}}
    filters, by_version = agent_tools.restore_plan(manifest, latest)
    assert filters == ["--exclude", "*", "--include", "a[[]1][*].pt", "--include", "b.pt"], "glob characters escaped"
    assert by_version == [("optim.pt", "v-optim.pt")]
    _, deleted = agent_tools.restore_plan(manifest, _newest(**{"b.pt": 1, "a[1]*.pt": 2}))
    assert deleted == [("optim.pt", "v-optim.pt")], "a rotated file deleted before the manifest followed"


def test_a_manifest_from_before_versions_restores_its_files_by_name():
    filters, by_version = agent_tools.restore_plan({"files": {"ckpt-6.npz": 10}}, {})
    assert (filters, by_version) == (["--exclude", "*", "--include", "ckpt-6.npz"], [])


def test_delete_batches_respect_the_thousand_key_limit_of_delete_objects():
    batches = agent_tools.delete_batches("checkpoints/r/", [f"f{i}" for i in range(2001)])
    assert [len(batch["Objects"]) for batch in batches] == [1000, 1000, 1]
    assert batches[0]["Objects"][0] == {"Key": "checkpoints/r/f0"} and batches[0]["Quiet"] is True


def test_commit_says_changed_unchanged_or_kept_and_never_overwrites_the_manifest_it_keeps(tmp_path, capsys):
    folder, state = tmp_path / "checkpoints", tmp_path / "state"
    folder.mkdir()
    state.mkdir()
    (folder / "ckpt-1.pt").write_text("12345")
    listing = [["checkpoints/r/ckpt-1.pt", "v1", '"e"', 5]]
    (state / "versions.json").write_text(json.dumps(listing))

    def commit() -> str:
        agent_tools.main(["manifest", "snapshot", "--folder", str(folder), "--snapshot", f"{state}/snap.json"])
        agent_tools.main(
            ["manifest", "commit", "--folder", str(folder), "--snapshot", f"{state}/snap.json", "--versions",
             f"{state}/versions.json", "--prefix", "checkpoints/r/", "--manifest", f"{state}/m.json",
             "--sent", f"{state}/sent.json"]
        )  # fmt: skip
        return capsys.readouterr().out.strip()

    assert commit() == "changed", "nothing was sent yet"
    (state / "m.json").replace(state / "sent.json")
    assert commit() == "unchanged", "the same files at the same versions: no new manifest version in S3"
    (state / "versions.json").write_text(json.dumps([["checkpoints/r/ckpt-1.pt", "v2", '"f"', 5]]))
    assert commit() == "changed", "a new version of a file is a new manifest"
    written = (state / "m.json").read_text()
    (state / "versions.json").write_text(json.dumps([["checkpoints/r/ckpt-1.pt", "v3", '"g"', 2]]))
    assert commit() == "kept ckpt-1.pt", "S3 does not hold what the upload started with: names what moved"
    assert (state / "m.json").read_text() == written and not list(state.glob("ckpt.delete.*.json"))


def test_tools_use_only_the_standard_library():
    """The instance's python3 has no boto3 or third-party packages: the helpers must not import any."""
    probe = "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]; import runpy; "
    probe += f"runpy.run_path({str(TOOLS)!r}, run_name='not_main')"
    subprocess.run([sys.executable, "-I", "-c", probe], check=True)


def test_secrets_policy_widens_only_a_partial_secrets_manager_arn_with_the_suffix_pattern():
    partial = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:team/hf-token"
    full = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:team/wandb-AbC123"
    policy = agent_tools.secrets_policy(
        [f"HF={partial}", f"WB={full}"], role_arn="arn:aws:iam::123456789012:role/reader", region="eu-west-1"
    )

    [secrets, kms] = policy["Statement"]
    assert secrets["Resource"] == [partial, f"{partial}-??????", full]
    assert kms["Resource"] == "arn:aws:kms:eu-west-1:123456789012:key/*"
    assert kms["Condition"]["StringEquals"]["kms:ViaService"] == [
        "ssm.eu-west-1.amazonaws.com",
        "secretsmanager.eu-west-1.amazonaws.com",
    ]
