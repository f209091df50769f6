"""The writer side of the handover: after a spot notice, the old agent writes no checkpoint past its deadline (the
notice's action time), so the replacement, which restores once that deadline plus a margin passed, never restores
beside a writer."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from training_infra.compute.agent.ti_agent import checkpoints, handover
from training_infra.compute.agent.ti_agent.aws import Aws, CliResult

AT = datetime(2026, 11, 29, 8, 32, tzinfo=UTC).timestamp()


def test_the_deadline_is_the_notices_action_time_and_never_more_than_two_minutes_after_it_was_seen():
    body = json.dumps({"action": "terminate", "time": "2026-11-29T08:32:00Z"})
    assert handover.notice_deadline(body, AT - 120) == AT
    assert handover.notice_deadline(body, AT - 200) == AT - 80, "an action time further out: two minutes from seen"
    assert handover.notice_deadline("not json", AT - 120) == AT, "no time: two minutes from when it was seen"


class RecordingCli:
    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], float | None]] = []

    def cli(self, *args: str, timeout: float | None = None, **_: object) -> CliResult:
        self.calls.append((args, timeout))
        if args[:2] == ("s3api", "list-object-versions"):
            return CliResult(0, "[]", "")
        return CliResult(0, "", "")


def _store(tmp_path: Path, aws: object, lines: list[str]) -> checkpoints.Checkpoints:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "ckpt" / "step-9.pt").write_bytes(b"w" * 64)
    return checkpoints.Checkpoints(
        aws=aws, folder=tmp_path / "ckpt", state_dir=tmp_path / "state", bucket="b", run_id="r", skip="",
        log=lines.append, note=lines.append,
    )  # fmt: skip


def test_past_the_deadline_no_checkpoint_write_is_sent_and_the_cut_off_is_said_in_one_line(tmp_path):
    cli, lines = RecordingCli(), []
    store = _store(tmp_path, cli, lines)
    store.cut_off(time.time() - 1, "spot notice")
    assert store.sync() is False and store.sync() is False
    assert cli.calls == [], "no S3 call at all"
    [said] = [line for line in lines if "handover deadline" in line]
    assert said.startswith("checkpoint upload stopped at the handover deadline ") and "(spot notice)" in said


def test_before_the_deadline_each_write_may_take_only_the_time_left(tmp_path):
    cli, lines = RecordingCli(), []
    store = _store(tmp_path, cli, lines)
    store.cut_off(time.time() + 50, "spot notice")
    assert store.sync() is True
    writes = [(args[:2], timeout) for args, timeout in cli.calls if args[:2] != ("s3api", "list-object-versions")]
    assert writes and all(timeout is not None and 40 < timeout <= 50 for _, timeout in writes), writes
    assert not any("handover deadline" in line for line in lines)


def test_an_upload_still_running_at_the_deadline_is_ended_then_and_no_manifest_follows(tmp_path):
    """The real AWS CLI door (Aws.cli) with a stand-in `aws` that uploads for a minute."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/aws.calls\nexec sleep 60\n')
    (bin_dir / "aws").chmod(0o755)
    lines: list[str] = []
    store = _store(tmp_path, Aws(region="us-east-1", environ={"PATH": f"{bin_dir}:/usr/bin:/bin"}), lines)
    store.cut_off(time.time() + 1.5, "spot notice")
    began = time.monotonic()
    assert store.sync() is False
    assert time.monotonic() - began < 10, "ended at the deadline, not after the upload's minute"
    calls = (tmp_path / "aws.calls").read_text().splitlines()
    assert len(calls) == 1 and " s3 sync " in f" {calls[0]}", "the sync only: no manifest, no delete after it"
    assert sum("checkpoint upload stopped at the handover deadline" in line for line in lines) == 1


def test_a_spot_notice_gives_the_agent_its_deadline_and_the_final_sync_then_writes_nothing(tmp_path):
    from training_infra.compute.agent.ti_agent.agent import Agent
    from training_infra.compute.agent.ti_agent.watchers import SpotWatcher
    from training_infra.local.imds import FakeImds

    with FakeImds() as imds:
        agent = Agent({"TI_ROOT": str(tmp_path / "root"), "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url})
        cli, lines = RecordingCli(), []
        agent.checkpoints = _store(tmp_path, cli, lines)
        imds.inject_spot_interruption(in_seconds=120)
        seen = time.time()
        assert SpotWatcher(agent).tick() is True
    assert abs(agent.checkpoints.cut_off_at - (seen + 120)) < 3, "the notice's action time, two minutes out"
    agent.checkpoints.cut_off(time.time() - 1, "spot notice")  # the deadline has come (an earlier one wins)
    assert agent.final_checkpoint_sync() is False and cli.calls == []
    assert sum("handover deadline" in line for line in lines) == 1


def test_a_notice_that_comes_during_the_final_sync_ends_its_upload_at_the_deadline(tmp_path):
    """The watchers stop at halt, and a final sync follows every trainer end: a notice then still starts the
    supervisor's replacement, so the sync, already running a minute-long upload, must end at the notice's deadline."""
    from training_infra.compute.agent.ti_agent.agent import Agent
    from training_infra.local.imds import FakeImds

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A Python stand-in keeps its arguments in /proc/PID/cmdline, as the real aws does (end_in_flight looks there).
    (bin_dir / "aws").write_text(f"#!{sys.executable}\nimport sys, time\n"
                                 f"open({str(tmp_path / 'aws.calls')!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                                 "if 'sync' in sys.argv: time.sleep(60)\nelse: print('[]')\n")  # fmt: skip
    (bin_dir / "aws").chmod(0o755)
    with FakeImds() as imds:
        agent = Agent({"TI_ROOT": str(tmp_path / "root"), "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url})
        lines: list[str] = []
        agent.log = lines.append  # type: ignore[method-assign]
        agent.checkpoints = _store(tmp_path, Aws(region="us-east-1", environ={"PATH": f"{bin_dir}:/usr/bin:/bin"}),
                                   lines)  # fmt: skip
        agent.halt.set()  # finalize has begun: every watcher has stopped
        imds.inject_spot_interruption(in_seconds=3)  # the notice lands while the final sync uploads
        began = time.monotonic()
        agent._final_sync_watching_for_a_notice()
        took = time.monotonic() - began
    assert took < 20, f"the upload was ended at the notice's deadline, not after its minute ({took:.0f} s)"
    assert agent.checkpoints.cut_off_at is not None and agent.checkpoints.past_cut_off()
    calls = (tmp_path / "aws.calls").read_text().splitlines()
    writes = [
        c
        for c in calls
        if not c.startswith(("--cli-connect-timeout 10 s3api list", "--cli-connect-timeout 10 s3api head"))
    ]
    assert len(writes) == 1 and " s3 sync " in f" {writes[0]}", f"the interrupted sync only, no manifest: {calls}"
    assert any("spot notice during the final sync" in line for line in lines), lines
