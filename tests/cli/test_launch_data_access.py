"""`data.access` (sync|mount, issue 29) is kept with the run: `launch -f`, `--like` and `--resume` keep
it, `status RUN` shows a mount, and `launch` says the AMI must provide mount-s3."""

from __future__ import annotations

import base64

from training_infra import naming
from training_infra import spec as run_spec
from training_infra.cli.launching import MOUNT_NOTE, supervisor_with, template_exports
from training_infra.supervisor.runtime.records import RunState, RunStore


def _store(stacks) -> RunStore:
    return RunStore(stacks.client("dynamodb"), stacks.outputs[naming.OUTPUT_RUN_TABLE])


def _box_data_access(stacks, run_id: str) -> list[str]:
    """TI_DATA_ACCESS on each of the run's instances, in launch order ('' where the stack's applies)."""
    found = []
    for instance in sorted(stacks.run_instances(run_id), key=lambda i: i["LaunchTime"]):
        value = stacks.client("ec2").describe_instance_attribute(
            InstanceId=instance["InstanceId"], Attribute="userData"
        )
        exports = template_exports(base64.b64decode(value["UserData"]["Value"]).decode())
        found.append(exports.get("TI_DATA_ACCESS", ""))
    return found


def _finish(stacks, run_id: str) -> None:
    """End a run as the supervisor does: final state and its run template deleted."""
    supervisor = supervisor_with(
        stacks.client, table=stacks.outputs[naming.OUTPUT_RUN_TABLE], outputs_bucket=stacks.outputs_bucket
    )
    run = supervisor.store.get(run_id)
    run.state, run.ended_at = RunState("stopped"), "2026-11-29T08:00:00Z"
    run.attempts[-1].ended_at = run.attempts[-1].ended_at or "2026-11-29T08:00:00Z"
    supervisor.store.save(run)
    stacks.client("ec2").delete_launch_template(LaunchTemplateId=run.spec.launch_template_id)


def test_data_access_from_a_spec_file_reaches_the_box_is_kept_and_like_copies_it(stacks, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("image: v2\ndata: {access: mount}\n")
    first = stacks.cli("launch", "-f", str(path), "--run-id", "da-orig")
    assert first.exit_code == 0, first.output
    assert first.stderr.count(f"note: {MOUNT_NOTE}") == 1, "the spec's mount gets the mount-s3 note too"
    assert run_spec.parse(_store(stacks).get("da-orig").spec_yaml).data.access == "mount"
    assert _box_data_access(stacks, "da-orig") == ["mount"]

    copy = stacks.cli("launch", "--like", "da-orig", "--run-id", "da-copy")
    assert copy.exit_code == 0, copy.output
    assert _box_data_access(stacks, "da-copy") == ["mount"], "--like copies data.access"
    changed = stacks.cli("launch", "--like", "da-orig", "--run-id", "da-sync", "--data-access", "sync")
    assert changed.exit_code == 0 and "mount-s3" not in changed.output, changed.output
    assert _box_data_access(stacks, "da-sync") == ["sync"], "the flag changes the copy"

    shown = stacks.cli("status", "da-orig")
    assert shown.exit_code == 0, shown.output
    assert "  data: mounted read-only at /data (data_access=mount, Mountpoint for Amazon S3)" in shown.stdout
    assert "  data: " not in stacks.cli("status", "da-sync").stdout, "a sync run's status says nothing of data"


def test_resume_keeps_the_runs_data_access_and_a_dry_run_says_the_ami_needs_mount_s3(stacks):
    assert stacks.cli("launch", "--run-id", "da-resume", "--data-access", "mount").exit_code == 0
    _finish(stacks, "da-resume")

    dry = stacks.cli("launch", "--run-id", "da-resume", "--resume", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"note: {MOUNT_NOTE}" in dry.stdout, "the kept mount is what the resume would use"
    resumed = stacks.cli("launch", "--run-id", "da-resume", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert _box_data_access(stacks, "da-resume") == ["mount", "mount"], "attempt 2 mounts as attempt 1 did"
    assert run_spec.parse(_store(stacks).get("da-resume").spec_yaml).data.access == "mount"
