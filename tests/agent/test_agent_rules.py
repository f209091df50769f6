"""The agent's pure rules, module by module (training_infra/compute/agent/ti_agent): no AWS, no agent run.

The end-to-end scenarios run the same modules inside the packed agent; these pin the edge cases a
scenario rarely hits, in milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training_infra.compute.agent.ti_agent import checkpoints, logship, paths, progress, settings
from training_infra.compute.agent.ti_agent.aws import SERVICES
from training_infra.compute.agent.ti_agent.checkpoints import Version
from training_infra.compute.agent.ti_agent.secrets import secrets_policy
from training_infra.compute.agent.ti_agent.status import Instance, Outcome, build_status
from training_infra.compute.user_data import AGENT_PACKAGE, AgentConfig, pack_agent

# ---------------------------------------------------------------- paths from outside


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../../etc/cron.d/x", "/etc/passwd", "a/./b", "a//b", "", ".", "..", "a\x00b", "a\\..\\b", "a/"],
)
def test_a_name_that_leaves_its_root_or_is_not_in_normal_form_is_refused(tmp_path, name):
    with pytest.raises(paths.UnsafePath):
        paths.safe_join(tmp_path, name)
    assert not paths.is_safe(name)


def test_a_name_through_a_symlinked_folder_is_refused_and_a_plain_one_is_joined(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(paths.UnsafePath, match="symlink"):
        paths.safe_join(root, "link/model.pt")
    assert paths.safe_join(root, "step-1/model.pt") == root / "step-1" / "model.pt"
    assert paths.is_safe("step-1/model.pt..bak"), "dots inside a name are a name"


def test_the_paths_module_uses_only_the_standard_library():
    """The CLI imports it too: nothing but the standard library, so the box and the laptop share one rule."""
    source = (AGENT_PACKAGE / "paths.py").read_text()
    imports = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert set(imports) <= {"__future__", "os", "posixpath", "pathlib"}


# ---------------------------------------------------------------- settings: one declaration


def test_settings_parse_every_rendered_field_back_with_its_type():
    config = AgentConfig(data_bucket="d", outputs_bucket="o", image_uri="i", auto_shutdown=False, idle_gpu_percent=2.5)
    from training_infra.compute.user_data import _export

    environ = {}
    for line in (_export(f"TI_{k.upper()}", v) for k, v in vars(config).items()):
        name, _, value = line.removeprefix("export ").partition("=")
        environ[name] = value.strip("'")
    environ["TI_RUNTIME"] = "process"
    environ["TI_TRAINING_COMMAND"] = "true"
    parsed = settings.parse(environ)
    assert parsed.config == AgentConfig(**{**vars(config), "training_command": "true"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TI_RUNTIME": "podman"}, "TI_RUNTIME='podman' is not allowed: use one of docker process"),
        ({"TI_STALL_SECONDS": "-5"}, "TI_STALL_SECONDS='-5' is not allowed: use a whole number (seconds or a count)"),
        ({"TI_STALL_SECONDS": "ten"}, "TI_STALL_SECONDS='ten' is not allowed: use a whole number (seconds or a count)"),
        ({"TI_SPOT_POLL_SECONDS": "0"}, "TI_SPOT_POLL_SECONDS=0 is not allowed: use at least 1"),
        ({"TI_IDLE_GPU_PERCENT": "x"}, "TI_IDLE_GPU_PERCENT='x' is not allowed: use a number such as 5 or 0.5"),
        ({"TI_POWEROFF_CMD": "halt -p"}, "TI_POWEROFF_CMD='halt -p' is not allowed: halt leaves the instance billing"),
        ({"TI_EXTRA_ENV": "no equals"}, "TI_EXTRA_ENV line 'no equals' is not allowed: use KEY=VALUE"),
        ({"TI_RUN_ID": "../x"}, "TI_RUN_ID='../x' is not allowed: use letters, digits, '.', '_' and '-'"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_the_value_and_what_is_allowed(env, message):
    base = {"TI_DATA_BUCKET": "d", "TI_OUTPUTS_BUCKET": "o", "TI_IMAGE_URI": "i"}
    with pytest.raises(settings.SettingError) as error:
        settings.parse({**base, **env})
    assert str(error.value) == message


def test_empty_settings_take_their_declared_defaults_and_imds_is_polled_each_second():
    parsed = settings.parse({"TI_DATA_BUCKET": "d", "TI_OUTPUTS_BUCKET": "o", "TI_IMAGE_URI": "i", "TI_IMAGE_TAG": ""})
    assert parsed.config.image_tag == "latest" and parsed.runtime is settings.Runtime.DOCKER
    assert parsed.config.spot_poll_seconds == 1, "IMDS is polled each second: a notice reaches the trainer in <= 2 s"


# ---------------------------------------------------------------- log batches by bytes


def test_log_batch_holds_back_a_line_still_being_written_until_the_final_flush(tmp_path):
    log = tmp_path / "training.log"
    log.write_bytes(b"epoch 1\nepoch 2\nepoch 3 half")
    batch = logship.next_batch(log, 0, final=False, now_ms=7)
    assert [e.message for e in batch.events] == ["epoch 1", "epoch 2"] and batch.next_offset == 16
    assert {e.timestamp_ms for e in batch.events} == {7}
    assert logship.next_batch(log, 16, final=False, now_ms=8) is None, "nothing complete yet"
    last = logship.next_batch(log, 16, final=True, now_ms=9)
    assert [e.message for e in last.events] == ["epoch 3 half"] and last.next_offset == log.stat().st_size


def test_log_batch_skips_blank_lines_but_consumes_their_bytes_and_replaces_bad_utf8(tmp_path):
    log = tmp_path / "training.log"
    log.write_bytes(b"\n   \nloss \xff\r\n\n")
    batch = logship.next_batch(log, 0, final=False, now_ms=0)
    assert [e.message for e in batch.events] == ["loss \ufffd"] and batch.next_offset == log.stat().st_size


def test_log_batches_are_cut_by_utf8_bytes_plus_26_as_cloudwatch_counts_them(tmp_path):
    log = tmp_path / "training.log"
    line = "€" * 20_000  # 60,000 bytes, 20,000 characters: a cut by characters would send 3x the limit
    log.write_text((line + "\n") * 40)
    batch = logship.next_batch(log, 0, final=False, now_ms=0)
    size = sum(len(e.message.encode()) + 26 for e in batch.events)
    assert size <= logship.BATCH_MAX_BYTES and len(batch.events) == 17, "17 x 60,027 bytes fit, 18 do not"
    assert batch.next_offset == 17 * (len(line.encode()) + 1), "the next batch starts at the first line left out"


def test_log_batches_stop_at_ten_thousand_events_and_cut_a_huge_line_on_a_character(tmp_path):
    log = tmp_path / "training.log"
    log.write_bytes(b"x\n" * 12_000 + "é".encode() * 200_000 + b"\n")
    batch = logship.next_batch(log, 0, final=False, now_ms=0)
    assert len(batch.events) == logship.BATCH_MAX_EVENTS and batch.next_offset == 20_000
    huge = logship.next_batch(log, 24_000, final=True, now_ms=0)
    [event] = huge.events
    assert len(event.message.encode()) <= logship.EVENT_MAX_BYTES and set(event.message) == {"é"}


class RecordingLogs:
    def __init__(self, fail: bool = False) -> None:
        self.batches, self.fail = [], fail

    def put_log_events(self, group: str, stream: str, events: list[dict]) -> None:
        if self.fail:
            raise OSError("throttled")
        self.batches.append([e["message"] for e in events])


def test_the_shipper_moves_its_offset_only_after_a_batch_landed(tmp_path):
    log = tmp_path / "training.log"
    log.write_text("a\nb\n")
    failing = RecordingLogs(fail=True)
    shipper = logship.LogShipper(failing, log, "g", "s", lambda: 0)
    with pytest.raises(OSError):
        shipper.ship()
    assert shipper.offset == 0, "a failed upload is sent again"
    shipper.aws = working = RecordingLogs()
    shipper.ship()
    assert working.batches == [["a", "b"]] and shipper.offset == 4
    shipper.ship()
    assert working.batches == [["a", "b"]], "nothing new, nothing sent"


# ---------------------------------------------------------------- the heartbeat, read safely


def write_at(path: Path, text: str, at: float) -> None:
    path.write_text(text)
    os.utime(path, ns=(int(at * 1e9), int(at * 1e9)))


def test_progress_counts_a_changed_step_with_its_rate_and_a_rewrite_without_a_step_as_a_touch(tmp_path):
    beat = tmp_path / "heartbeat.json"
    state = progress.Progress()

    def look(now: float, since: float = 0) -> progress.Progress:
        nonlocal state
        state, _ = progress.observe(state, progress.read_heartbeat(beat), now, since=since)
        return state

    assert look(100).record() is None, "no file yet: never reported"
    write_at(beat, '{"step": 10, "loss": 0.5}', at=100)
    assert look(103).changed_epoch == 100, "the write's time"
    write_at(beat, '{"step": 10}', at=104)  # written again, same step: a heartbeat thread is not progress
    assert look(105).changed_epoch == 100
    write_at(beat, '{"step": 30}', at=110)
    assert look(130).record() == {"step": 30, "steps_per_second": 2.0, "changed_at": "1970-01-01T00:01:50Z"}
    write_at(beat, "", at=120)  # a touch
    assert look(140).changed_epoch == 120
    assert look(150).changed_epoch == 120, "not written again"


def test_progress_takes_no_beat_from_a_file_written_before_the_trainer_started(tmp_path):
    beat = tmp_path / "heartbeat.json"
    write_at(beat, '{"step": 900}', at=40)  # restored with the checkpoints: the last attempt's time
    seen, _ = progress.observe(progress.Progress(), progress.read_heartbeat(beat), 500, since=100)
    assert not seen.reported
    write_at(beat, '{"step": 900}', at=120)
    seen, _ = progress.observe(seen, progress.read_heartbeat(beat), 500, since=100)
    assert (seen.step, seen.changed_epoch) == (900, 120), "its first write after the start is a beat"


def test_progress_says_once_that_a_heartbeat_is_not_json(tmp_path):
    beat, state, said = tmp_path / "heartbeat.json", progress.Progress(), []
    for now, text in ((1, "{broken"), (2, "still [broken"), (3, '"a string"')):
        beat.write_text(text)
        state, line = progress.observe(state, progress.read_heartbeat(beat), now, since=0)
        said += [line] if line else []
        assert state.step is None
    assert said == ["is not JSON: counted as a touch (said once)"]


def test_a_fifo_heartbeat_is_no_beat_and_never_blocks_or_fills_memory(tmp_path):
    fifo = tmp_path / "heartbeat.json"
    os.mkfifo(fifo)
    writer_fd = os.open(fifo, os.O_RDWR)  # a writer that feeds it for ever would fill a whole-file read
    os.write(writer_fd, b"x" * 60_000)
    try:
        began = time.monotonic()
        assert progress.read_heartbeat(fifo) is None
        assert time.monotonic() - began < 1
    finally:
        os.close(writer_fd)


def test_a_sparse_ten_gigabyte_heartbeat_is_read_to_64_kb_only(tmp_path):
    beat = tmp_path / "heartbeat.json"
    with open(beat, "wb") as handle:
        handle.write(b'{"step": 7}')
        handle.truncate(10 * 1024**3)
    seen = progress.read_heartbeat(beat)
    assert len(seen.text) == progress.HEARTBEAT_MAX_BYTES
    state, line = progress.observe(progress.Progress(), seen, time.time(), since=0)
    assert state.reported and state.step is None and line.startswith("is not JSON"), "a touch, said once"


def test_a_folder_or_missing_heartbeat_is_no_beat(tmp_path):
    assert progress.read_heartbeat(tmp_path) is None
    assert progress.read_heartbeat(tmp_path / "absent") is None


# ---------------------------------------------------------------- checkpoint manifest rules


def _newest(**sizes: int) -> dict[str, Version]:
    return {name: Version(f"v-{name}", f'"{name}"', size) for name, size in sizes.items()}


def test_manifest_names_the_files_the_upload_carried_with_their_s3_version_and_drops_only_the_rest(tmp_path):
    (tmp_path / "shard").mkdir()
    for name in ("ckpt-1.pt", "shard/part-0.pt", "ckpt-2.pt.tmp", "_manifest.json", "heartbeat.json"):
        (tmp_path / name).write_text(name)
    (tmp_path / "link.pt").symlink_to(tmp_path / "ckpt-1.pt")
    snapshot = checkpoints.checkpoint_files(tmp_path, skip="heartbeat.json")
    assert sorted(snapshot) == ["ckpt-1.pt", "shard/part-0.pt"], "no .tmp, symlink, manifest or heartbeat"
    (tmp_path / "ckpt-3.pt").write_text("new during the upload")
    latest = _newest(**{"ckpt-1.pt": 9, "shard/part-0.pt": 15, "ckpt-0.pt": 4})
    manifest, stale = checkpoints.commit_manifest(tmp_path, snapshot, latest, now=0, skip="heartbeat.json")
    assert manifest.as_json() == {
        "files": {"ckpt-1.pt": latest["ckpt-1.pt"].as_json(), "shard/part-0.pt": latest["shard/part-0.pt"].as_json()},
        "written_at": "1970-01-01T00:00:00Z",
    }
    assert stale == ["ckpt-0.pt"], "only what is neither in the manifest nor on disk"


def test_a_checkpoint_rotated_away_during_the_upload_stays_in_the_manifest_and_in_s3(tmp_path):
    (tmp_path / "ckpt-1.pt").write_text("12345")
    snapshot = checkpoints.checkpoint_files(tmp_path)
    (tmp_path / "ckpt-1.pt").unlink()
    (tmp_path / "ckpt-2.pt").write_text("67890")
    manifest, stale = checkpoints.commit_manifest(tmp_path, snapshot, _newest(**{"ckpt-1.pt": 5}), now=0)
    assert list(manifest.files) == ["ckpt-1.pt"] and stale == []


def test_half_a_sharded_checkpoint_rotated_away_before_the_upload_read_it_keeps_the_previous_manifest(tmp_path):
    (tmp_path / "global_step1").mkdir()
    for name in ("global_step1/a.bin", "global_step1/b.bin"):
        (tmp_path / name).write_text("12345")
    snapshot = checkpoints.checkpoint_files(tmp_path)
    (tmp_path / "global_step1/b.bin").unlink()
    latest = _newest(**{"global_step1/a.bin": 5, "global_step0/a.bin": 5, "global_step0/b.bin": 5})
    assert checkpoints.commit_manifest(tmp_path, snapshot, latest, now=0) == (None, ["global_step1/b.bin"])


def test_a_file_rewritten_during_the_upload_keeps_the_previous_manifest_and_deletes_nothing(tmp_path):
    for name in ("model.pt", "optim.pt", "old.pt"):
        (tmp_path / name).write_text("12345")
    snapshot = checkpoints.checkpoint_files(tmp_path)
    (tmp_path / "old.pt").unlink()
    (tmp_path / "optim.pt").write_text("half old, half new?")
    latest = _newest(**{"model.pt": 5, "optim.pt": 5, "old.pt": 5, "older.pt": 1})
    assert checkpoints.commit_manifest(tmp_path, snapshot, latest, now=0) == (None, ["optim.pt"])


def test_a_file_whose_newest_s3_version_is_not_the_uploaded_size_keeps_the_previous_manifest(tmp_path):
    (tmp_path / "model.pt").write_text("12345")
    snapshot = checkpoints.checkpoint_files(tmp_path)
    assert checkpoints.commit_manifest(tmp_path, snapshot, _newest(**{"model.pt": 3}), now=0) == (None, ["model.pt"])


def test_latest_versions_keeps_the_run_prefix_objects_without_the_manifest_and_reads_an_empty_listing():
    listing = [
        ["checkpoints/r1/a.pt", "v1", '"e1"', 3],
        ["checkpoints/r1/_manifest.json", "v2", '"e2"', 9],
        ["checkpoints/r10/b.pt", "v3", '"e3"', 4],
    ]
    assert checkpoints.latest_versions(listing, "checkpoints/r1/") == {"a.pt": Version("v1", '"e1"', 3)}
    assert checkpoints.latest_versions(None, "checkpoints/r1/") == {}, "list-object-versions says null when empty"


def test_restore_takes_current_files_by_name_and_ones_a_cut_upload_replaced_by_their_recorded_version():
    recorded = {name: v.as_json() for name, v in _newest(**{"b.pt": 1, "a[1]*.pt": 2, "optim.pt": 3}).items()}
    latest = _newest(**{"b.pt": 1, "a[1]*.pt": 2}) | {"optim.pt": Version("newer", '"x"', 5)}
    by_name, by_version = checkpoints.restore_plan(recorded, latest)
    assert checkpoints.include_filters(by_name) == ["--exclude", "*", "--include", "a[[]1][*].pt", "--include", "b.pt"]
    assert by_version == [("optim.pt", "v-optim.pt")]
    assert checkpoints.restore_plan({"ckpt-6.npz": 10}, {}) == (["ckpt-6.npz"], []), "a manifest from before versions"


def test_delete_batches_respect_the_thousand_key_limit_of_delete_objects():
    batches = checkpoints.delete_batches("checkpoints/r/", [f"f{i}" for i in range(2001)])
    assert [len(batch["Objects"]) for batch in batches] == [1000, 1000, 1]
    assert batches[0]["Objects"][0] == {"Key": "checkpoints/r/f0"} and batches[0]["Quiet"] is True


class FakeCli:
    """The AWS CLI as the restore calls it: a manifest, a listing, and a record of what it was asked."""

    def __init__(self, manifest: dict | None, listing: list) -> None:
        self.manifest, self.listing, self.calls = manifest, listing, []

    def cli(self, *args: str, **_: object):
        from training_infra.compute.agent.ti_agent.aws import CliResult

        self.calls.append(args)
        if args[:2] == ("s3", "cp") and args[2].endswith("_manifest.json"):
            if self.manifest is None:
                return CliResult(1, "", "404")
            Path(args[3]).write_text(json.dumps(self.manifest))
            return CliResult(0, "", "")
        if args[:2] == ("s3api", "list-object-versions"):
            return CliResult(0, json.dumps(self.listing), "")
        return CliResult(0, "", "")


def _store(tmp_path: Path, cli: FakeCli, lines: list[str]) -> checkpoints.Checkpoints:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "state").mkdir()
    return checkpoints.Checkpoints(
        aws=cli, folder=tmp_path / "ckpt", state_dir=tmp_path / "state", bucket="b", run_id="r", skip="",
        log=lines.append, note=lines.append,
    )  # fmt: skip


def test_a_manifest_naming_a_path_outside_the_folder_fails_the_attempt_and_fetches_nothing(tmp_path):
    manifest = {"files": {"ok.pt": {"version_id": "v1"}, "../../etc/cron.d/x": {"version_id": "v2"}}}
    cli, lines = FakeCli(manifest, [["checkpoints/r/ok.pt", "v9", '"e"', 1]]), []
    with pytest.raises(checkpoints.AttemptFailed, match=r"'\.\./\.\./etc/cron\.d/x'.*nothing restored"):
        _store(tmp_path, cli, lines).restore()
    assert [line for line in lines if "refused checkpoint key" in line] == [
        "refused checkpoint key checkpoints/r/'../../etc/cron.d/x': '../../etc/cron.d/x' leaves its folder or is not"
        " in normal form ('..', '.', '//')"
    ]
    assert not any(call[:2] in (("s3", "sync"), ("s3api", "get-object")) for call in cli.calls), "nothing fetched"


def test_without_a_manifest_keys_outside_the_folder_are_left_out_one_line_each(tmp_path):
    listing = [["checkpoints/r/ok.pt", "v1", '"e"', 1], ["checkpoints/r/../../x", "v2", '"e"', 1]]
    cli, lines = FakeCli(None, listing), []
    _store(tmp_path, cli, lines).restore()
    [sync] = [call for call in cli.calls if call[:2] == ("s3", "sync")]
    assert sync[-5:] == ("--exclude", "*", "--include", "ok.pt", "--only-show-errors"), "only the safe key"
    assert sum("refused checkpoint key checkpoints/r/'../../x'" in line for line in lines) == 1


# ---------------------------------------------------------------- status, secrets, signing


def test_status_has_the_documented_fields_in_order_and_the_cost_estimate():
    status = build_status(
        run_id="r1", attempt=2, outcome=Outcome.FAILED, exit_code=None, started_at="a", ended_at="b",
        duration_seconds=1800, instance=Instance("i-1", "g5.xlarge", "us-east-1a", "spot"), hourly_price_usd=1.006,
        image="img", message="-x", progress=None,
    )  # fmt: skip
    assert list(status) == [
        "run_id", "attempt", "outcome", "exit_code", "started_at", "ended_at", "duration_seconds", "instance_id",
        "instance_type", "market", "availability_zone", "hourly_price_usd", "estimated_cost_usd", "image", "message",
        "progress", "cold_start",
    ]  # fmt: skip
    assert status["estimated_cost_usd"] == 0.503 and status["outcome"] == "failed" and status["exit_code"] is None
    assert json.loads(json.dumps(status)) == status


def test_secrets_policy_widens_only_a_partial_secrets_manager_arn_with_the_suffix_pattern():
    partial = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:team/hf-token"
    full = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:team/wandb-AbC123"
    policy = secrets_policy(
        [f"HF={partial}", f"WB={full}"], role_arn="arn:aws:iam::123456789012:role/reader", region="eu-west-1"
    )
    [secrets, kms] = policy["Statement"]
    assert secrets["Resource"] == [partial, f"{partial}-??????", full]
    assert kms["Condition"]["StringEquals"]["kms:ViaService"] == [
        "ssm.eu-west-1.amazonaws.com",
        "secretsmanager.eu-west-1.amazonaws.com",
    ]


# ---------------------------------------------------------------- the package as the box runs it


def _unpacked_agent(tmp_path: Path) -> Path:
    """The asset as the bootstrap unpacks it."""
    folder = tmp_path / "agent"
    folder.mkdir()
    (tmp_path / "agent.tar.xz").write_bytes(pack_agent())
    subprocess.run(["tar", "-xJf", str(tmp_path / "agent.tar.xz"), "-C", str(folder)], check=True)
    return folder


def test_the_asset_carries_the_models_of_the_agents_services_and_no_other(tmp_path):
    folder = _unpacked_agent(tmp_path)
    models = folder / "botocore" / "data"
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == sorted(SERVICES)
    assert {p.name for p in models.glob("*.json")} == {
        "_retry.json", "endpoints.json", "partitions.json", "sdk-default-configuration.json"
    }  # fmt: skip
    assert not list(folder.rglob("*.pyc")), "no bytecode: the asset is byte-stable and python3 compiles its own"


def test_every_client_the_agent_makes_resolves_offline_from_the_asset_alone(tmp_path):
    """The box's python3 has no botocore, or another version: with no site-packages at all (-I -S), the
    unpacked asset makes each client in SERVICES from its own data and endpoint rules, no network, and
    a service outside SERVICES is refused before botocore looks for its model."""
    folder = _unpacked_agent(tmp_path)
    probe = f"""
import sys
sys.path.insert(0, {str(folder)!r})
from ti_agent.aws import SERVICES, Aws
import ti_agent.agent, ti_agent.watchers
aws = Aws(region="eu-west-1", environ={{}})
for service in SERVICES:
    client = aws.client(service)
    assert client.meta.endpoint_url.endswith(".amazonaws.com"), client.meta.endpoint_url
    assert client is aws.client(service), "one client per service"
import botocore
assert botocore.__file__.startswith({str(folder)!r}), botocore.__file__
assert client.meta.config.retries["mode"] == "standard"
try:
    aws.client("sqs")
except ValueError as error:
    print(error)
"""
    environment = {"PATH": os.environ["PATH"], "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
                   "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], env=environment, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "'sqs' is not in SERVICES" in done.stdout


def test_the_clients_the_agent_code_asks_for_are_all_in_services():
    """The asset has the models of SERVICES alone: a call added to aws.py for another service must add it there."""
    import ast

    source = (AGENT_PACKAGE / "aws.py").read_text()
    asked = {
        node.args[0].value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"_call", "client"}
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert asked and asked <= set(SERVICES), asked
    others = [p.name for p in AGENT_PACKAGE.glob("*.py") if p.name != "aws.py" and "botocore" in p.read_text()]
    assert others == [], "only aws.py makes botocore clients"


# ---------------------------------------------------------------- review of issue 22: what came from outside


def test_a_symlinked_heartbeat_is_never_opened_whether_it_points_at_a_device_or_a_host_file(tmp_path, monkeypatch):
    """The trainer owns the progress folder; the agent is root: a planted link must not open /dev/watchdog."""
    secret = tmp_path / "host-file"
    secret.write_text('{"step": 99}')
    opened = []
    real_open = os.open
    monkeypatch.setattr(progress.os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    for target in ("/dev/zero", str(secret)):
        beat = tmp_path / "heartbeat.json"
        beat.unlink(missing_ok=True)
        beat.symlink_to(target)
        assert progress.read_heartbeat(beat) is None
    assert opened == [], "neither link was opened"


def test_a_heartbeat_swapped_between_the_look_and_the_open_is_no_beat(tmp_path, monkeypatch):
    beat, other = tmp_path / "heartbeat.json", tmp_path / "other"
    beat.write_text('{"step": 1}')
    other.write_text('{"step": 2}')
    assert progress.read_heartbeat(beat).text == '{"step": 1}'
    monkeypatch.setattr(progress.os, "lstat", lambda path: os.stat(other))  # the look saw another inode
    assert progress.read_heartbeat(beat) is None


def test_a_checkpoint_gone_while_the_folder_is_walked_is_left_out_not_an_error(tmp_path, monkeypatch):
    for name in ("checkpoint-1/model.pt", "checkpoint-2/model.pt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    real_lstat = os.lstat

    def rotated(path, *args, **kwargs):
        if "checkpoint-1" in str(path):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.os, "lstat", rotated)
    assert list(checkpoints.checkpoint_files(tmp_path)) == ["checkpoint-2/model.pt"]


def test_without_a_manifest_every_safe_key_is_named_never_a_wildcard(tmp_path):
    """A key put after the listing must not bypass the name check by riding on `--include *`."""
    listing = [["checkpoints/r/a.pt", "v1", '"e"', 1], ["checkpoints/r/b/c.pt", "v2", '"e"', 1]]
    cli = FakeCli(None, listing)
    _store(tmp_path, cli, []).restore()
    [sync] = [call for call in cli.calls if call[:2] == ("s3", "sync")]
    assert sync[-7:] == ("--exclude", "*", "--include", "a.pt", "--include", "b/c.pt", "--only-show-errors")


def test_finalize_takes_a_bad_environment_field_by_field_keeping_the_good_ones():
    """When `parse` refuses TI_*, finalize still uses the power-off command and the retries it was given."""
    env = {"TI_POWEROFF_CMD": "echo off", "TI_RETRY_ATTEMPTS": "many", "TI_OUTPUTS_BUCKET": "o", "TI_RUNTIME": "x"}
    with pytest.raises(settings.SettingError):
        settings.parse(env)
    fallback = settings.lenient(env)
    assert (fallback.knobs.poweroff_cmd, fallback.knobs.retry_attempts) == ("echo off", 4)
    assert (fallback.config.outputs_bucket, fallback.knobs.runtime) == ("o", "docker")


class UploadCli(FakeCli):
    """The CLI as a sync calls it: the upload succeeds, the listing is what S3 holds after it."""

    def cli(self, *args: str, **kwargs: object):
        if args[:2] == ("s3", "cp") and args[3].endswith("_manifest.json"):
            self.calls.append((*args, json.loads(Path(args[2]).read_text())["files"]))
            return FakeCli(None, []).cli("s3", "sync")
        return super().cli(*args, **kwargs)

    def sent(self) -> list[dict]:
        return [call[-1] for call in self.calls if call[:2] == ("s3", "cp")]


def test_a_sync_sends_the_manifest_only_when_its_files_changed_then_deletes_what_the_trainer_dropped(tmp_path):
    cli, lines = UploadCli(None, []), []
    store = _store(tmp_path, cli, lines)
    (store.folder / "a.pt").write_text("1")
    cli.listing = [["checkpoints/r/a.pt", "v1", '"e"', 1], ["checkpoints/r/old.pt", "v0", '"e"', 3]]
    assert store.sync() is True
    assert cli.sent() == [{"a.pt": {"version_id": "v1", "etag": '"e"', "size": 1}}]
    deletes = [call for call in cli.calls if call[:2] == ("s3api", "delete-objects")]
    assert len(deletes) == 1, "old.pt, neither in the manifest nor on disk, goes after the manifest"
    assert cli.calls.index(deletes[0]) > max(i for i, c in enumerate(cli.calls) if c[:2] == ("s3", "cp"))
    cli.listing = cli.listing[:1]
    assert store.sync() is True and len(cli.sent()) == 1, "unchanged: not sent again"


def test_a_sync_whose_files_moved_under_it_keeps_the_sent_manifest_and_says_so_after_three(tmp_path):
    cli, lines = UploadCli(None, []), []
    store = _store(tmp_path, cli, lines)
    (store.folder / "a.pt").write_text("1")
    cli.listing = [["checkpoints/r/a.pt", "v1", '"e"', 1]]
    store.sync()
    cli.listing = [["checkpoints/r/a.pt", "v2", '"e"', 5]]  # S3 holds another size than the file uploaded
    for _ in range(3):
        assert store.sync() is True
    assert len(cli.sent()) == 1, "the manifest kept is never overwritten by a partial set"
    assert not any(call[:2] == ("s3api", "delete-objects") for call in cli.calls)
    assert sum("for 3 syncs in a row" in line for line in lines) == 1


def test_finalize_ends_a_hung_periodic_upload_so_the_final_sync_does_not_queue_behind_it(tmp_path):
    """Only the agent's own child whose arguments name this run's checkpoints is ended."""
    import threading

    class HungCli(FakeCli):
        def cli(self, *args: str, **kwargs: object):
            if args[:2] == ("s3", "sync"):
                code = subprocess.run([sys.executable, "-c", "import time; time.sleep(60)", *args], check=False)
                from training_infra.compute.agent.ti_agent.aws import CliResult

                return CliResult(code.returncode, "", "cut")
            return super().cli(*args, **kwargs)

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "s3://other/checkpoints/x/"])
    try:
        store = _store(tmp_path, HungCli(None, []), [])
        assert store.end_in_flight() == 0, "nothing in flight"
        result = []
        periodic = threading.Thread(target=lambda: result.append(store.sync()))
        periodic.start()
        for _ in range(100):
            if store.end_in_flight():
                break
            time.sleep(0.05)
        periodic.join(10)
        assert not periodic.is_alive() and result == [False], "the hung sync failed and freed the lock"
        assert bystander.poll() is None, "another child of the agent is left alone"
    finally:
        bystander.kill()
        bystander.wait()
