"""The sandbox's rules that need no running sandbox: which process a state.json names, when `make` treats
AWS_ENDPOINT_URL as the local AWS (adding moto's AMI and CloudFormation flags), what a killed sandbox's
children get (and a reused pid does not), one-line failures that keep their logs, the reconcile's wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training_infra.local import sandbox as sandbox_module
from training_infra.local.emulator import Emulator, EmulatorError
from training_infra.local.events import DeliveryRule, EventDelivery
from training_infra.local.processes import ChildProcess
from training_infra.local.sandbox import Sandbox, SandboxError, SandboxState, process_identity, serves, stop_running

ROOT = Path(__file__).resolve().parents[1]
ENDPOINT = "http://localhost:45678"


def _state(folder: Path, *, identity: str, phase: str = "ready", pid: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    SandboxState(
        pid=pid or os.getpid(), endpoint=ENDPOINT, region="us-east-1", runtime="process", schedule_seconds=60,
        phase=phase, started_at="2026-12-04T00:00:00+00:00", identity=identity,
    ).write(folder)  # fmt: skip
    return folder


def test_a_state_json_whose_pid_now_belongs_to_another_process_is_not_alive(tmp_path):
    mine = SandboxState.read(_state(tmp_path / "live", identity=process_identity(os.getpid())))
    reused = SandboxState.read(_state(tmp_path / "stale", identity="another-boot:123"))

    assert mine.alive
    assert not reused.alive, "a reused pid (after a reboot) must not be taken for the sandbox, nor be sent SIGTERM"


@pytest.mark.parametrize(
    ("phase", "identity", "endpoint", "expected"),
    [
        ("ready", "mine", ENDPOINT, True),
        ("ready", "mine", ENDPOINT + "/", True),
        ("ready", "mine", "http://localhost:8443", False),  # a loopback proxy or tunnel to real AWS
        ("ready", "stale", ENDPOINT, False),  # exports left over after the sandbox went away
        ("starting", "mine", ENDPOINT, False),
        ("ready", "mine", "", False),
    ],
)
def test_only_a_live_ready_sandbox_at_exactly_that_endpoint_is_the_local_aws(
    tmp_path, phase, identity, endpoint, expected
):
    folder = _state(tmp_path, identity=process_identity(os.getpid()) if identity == "mine" else "x:1", phase=phase)
    assert serves(endpoint, folder) is expected


def _make_n_deploy(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "TRAINING_INFRA_LOCAL")}
    result = subprocess.run(
        ["make", "-n", "deploy"], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return result.stdout


def test_make_deploy_adds_the_emulators_flags_only_while_a_sandbox_serves_that_endpoint(tmp_path):
    live = _state(tmp_path / "live", identity=process_identity(os.getpid()))
    stale = _state(tmp_path / "stale", identity="x:1")

    to_sandbox = _make_n_deploy({"AWS_ENDPOINT_URL": ENDPOINT, "TRAINING_INFRA_LOCAL": str(live)})
    left_over = _make_n_deploy({"AWS_ENDPOINT_URL": ENDPOINT, "TRAINING_INFRA_LOCAL": str(stale)})
    proxy = _make_n_deploy({"AWS_ENDPOINT_URL": "http://localhost:8443", "TRAINING_INFRA_LOCAL": str(live)})

    assert "image_id=ami-12c6146b" in to_sandbox and "--method=direct" in to_sandbox
    for real_aws in (left_over, proxy):
        assert "image_id=" not in real_aws and "--method=direct" not in real_aws


# ---------------------------------------------------------------------------------------------- orphans


def _own_group(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(list(argv), start_new_session=True)


def _killed_sandbox(folder: Path, children: list[ChildProcess]) -> Path:
    """The folder a SIGKILLed sandbox leaves: its state.json naming a process that is gone, and its children."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder.mkdir(parents=True, exist_ok=True)
    SandboxState(
        pid=dead.pid, endpoint=ENDPOINT, region="us-east-1", runtime="process", schedule_seconds=60,
        phase="ready", started_at="2026-12-04T00:00:00+00:00", identity="gone:1",
        children=[child.dump() for child in children],
    ).write(folder)  # fmt: skip
    (folder / "instances").mkdir()
    return folder


def test_local_down_after_a_killed_sandbox_ends_its_children_groups_and_removes_its_folder(tmp_path):
    moto = _own_group("sleep", "60")
    folder = _killed_sandbox(tmp_path / "sandbox", [ChildProcess.of("moto", moto.pid)])
    lines: list[str] = []

    assert stop_running(folder, say=lines.append) is None

    assert moto.wait(timeout=5) == -signal.SIGTERM
    assert len(lines) == 1 and lines[0].endswith(f"moto (process group {moto.pid}): stopped (SIGTERM)")
    assert not folder.exists()


def test_a_recorded_pid_now_used_by_another_process_is_never_signalled(tmp_path):
    stranger = _own_group("sleep", "60")
    try:
        recorded = ChildProcess("moto", stranger.pid, identity=process_identity(stranger.pid) + "0")
        assert recorded.status() == "reused"
        lines: list[str] = []
        stop_running(_killed_sandbox(tmp_path / "sandbox", [recorded]), say=lines.append)

        assert stranger.poll() is None, "the process that now has the number lives on"
        assert lines[0].endswith(
            f"moto (process group {stranger.pid}): not signalled: its pid now belongs to another process"
        )
    finally:
        stranger.kill()
        stranger.wait()


def test_a_group_whose_leader_exited_is_still_ended_by_its_recorded_number(tmp_path):
    # An agent whose bash exited while its trainer runs on in the group.
    leader = _own_group("bash", "-c", "sleep 60 & sleep 0.5")
    recorded = ChildProcess.of("agent i-0abc", leader.pid)
    leader.wait()
    [trainer] = recorded.members()

    assert recorded.status() == "ours"
    assert recorded.end(grace_seconds=5) == "stopped (SIGTERM)"
    assert recorded.status() == "gone" and trainer not in recorded.members()


# ---------------------------------------------------------------------------------------------- one line, nothing lost


def test_make_demo_refuses_a_workdir_it_did_not_make_in_one_line_and_leaves_its_files(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "training_infra.local.demo", "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [
        f"make demo: --workdir {tmp_path}: not empty and not made by `make demo` (no .training-infra-demo); "
        "give a new or empty folder"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_a_failed_local_up_is_one_line_naming_its_log_and_down_keeps_that_log(tmp_path, monkeypatch):
    folder = tmp_path / "sandbox"

    def moto_fails(self, timeout=30.0):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / "moto.log").write_text("Address already in use\n")
        raise EmulatorError(f"moto_server exited with 1; see {self.log_dir / 'moto.log'}")

    monkeypatch.setattr(Emulator, "start", moto_fails)
    lines: list[str] = []
    with pytest.raises(SandboxError) as refused:
        Sandbox(folder=folder, say=lines.append).run()

    assert str(refused.value) == (
        f"moto_server exited with 1; see {folder / 'emulator' / 'moto.log'} (details in {folder / 'sandbox.log'})"
    )
    assert (folder / "emulator" / "moto.log").read_text() == "Address already in use\n", "the named log is kept"
    assert "Traceback" in (folder / "sandbox.log").read_text()
    assert SandboxState.read(folder).phase == "failed"
    assert (
        lines[-1] == f"local AWS stopped; its logs kept in {folder} (the next `local up` or `local down` removes them)"
    )
    assert stop_running(folder) is None and not folder.exists(), "`local down` then removes them"


class _Player:
    """An instance player whose agent is still on its way down (or not)."""

    def __init__(self) -> None:
        self.down = True

    def shutting_down(self) -> bool:
        return self.down

    def tick(self) -> None:
        pass


def test_the_scheduled_reconcile_waits_while_an_ended_instances_agent_still_uploads(tmp_path):
    calls: list[dict] = []
    sandbox = Sandbox(folder=tmp_path / "sandbox", schedule_seconds=60)
    sandbox.player = _Player()
    sandbox.events = EventDelivery(
        rules=[DeliveryRule(name="Reconcile", arn="arn:rule/reconcile", schedule="rate(1 minute)")],
        handler=calls.append, say=lambda line: None,
    )  # fmt: skip
    (sandbox.folder / "control").mkdir(parents=True)

    sandbox.tick()
    assert calls == [], "no reconcile (no relaunch) before the agent's final upload"
    sandbox.player.down = False
    sandbox.tick()
    sandbox.tick()
    assert [c["detail-type"] for c in calls] == ["Scheduled Event"], "then one, and the next a schedule later"


def test_a_failed_cdk_step_is_one_line_naming_the_cdk_log(tmp_path, monkeypatch):
    fake = tmp_path / "cdk"
    fake.write_text("#!/bin/sh\necho 'TrainingInfra-Storage: deploying...'\necho 'Error: moto said no' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox_module, "CDK", fake)
    sandbox = Sandbox(folder=tmp_path / "sandbox")
    sandbox.folder.mkdir()

    with pytest.raises(SandboxError) as failed:
        sandbox._cdk("deploy", "--all")

    assert str(failed.value) == f"cdk deploy exited 1: Error: moto said no (all of it in {sandbox.folder / 'cdk.log'})"
    assert "deploying..." in (sandbox.folder / "cdk.log").read_text()


def test_make_demo_workdir_not_made_by_a_demo_is_refused_and_left_untouched(tmp_path):
    from training_infra.local.demo import _claim_workdir

    (tmp_path / "thesis.tex").write_text("mine")
    refusal = _claim_workdir(tmp_path)

    assert refusal is not None and "not made by `make demo`" in refusal and str(tmp_path) in refusal
    assert (tmp_path / "thesis.tex").read_text() == "mine"


def test_make_demo_stops_an_earlier_demos_local_aws_still_running_before_emptying_its_folder(tmp_path):
    """A demo killed before its clean-up leaves its sandbox running on the folder; deleting its state.json
    first would orphan it, and its own later shut-down would delete the new demo's sandbox."""
    from training_infra.local.demo import OWNER_MARK, _claim_workdir

    (tmp_path / OWNER_MARK).write_text("made by `make demo`\n")
    earlier = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _state(tmp_path / "sandbox", identity=process_identity(earlier.pid), pid=earlier.pid)

        assert _claim_workdir(tmp_path) is None
        assert earlier.wait(timeout=10) == -signal.SIGTERM, "the earlier sandbox was asked to stop first"
        assert not (tmp_path / "sandbox").exists() and (tmp_path / OWNER_MARK).is_file()
    finally:
        earlier.kill()


def test_a_killed_sandboxs_containers_are_removed_from_its_own_container_storage(tmp_path):
    """podman's conmon leaves the agent's process group, so ending the recorded groups is not enough."""
    from training_infra.local.sandbox import clean_up_after

    folder = tmp_path / "sandbox"
    docker = folder / "container-engine" / "bin" / "docker"
    docker.parent.mkdir(parents=True)
    calls = tmp_path / "calls"
    docker.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 0123456789abcdef0123\n')
    docker.chmod(0o755)
    state = SandboxState.read(_state(folder, identity="another-boot:1", pid=2**22 - 1))

    lines = clean_up_after(folder, state)

    assert calls.read_text().split() == ["rm", "--force", "--all", "--time", "5"]
    assert "container 0123456789ab removed" in lines
    assert not folder.exists()


def test_an_instances_processes_outside_its_agents_group_are_found_by_its_root_and_ended(tmp_path):
    import os
    import subprocess
    import sys

    from training_infra.local.processes import end_processes_with, processes_with

    root = str(tmp_path / "fs")
    env = {**os.environ, "TI_ROOT": root}
    # A torchrun of the instance in a session of its own, and a process of another instance.
    own = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**env, "TI_ROOT": root + "-other"}, start_new_session=True)  # fmt: skip
    try:
        assert own.pid in processes_with("TI_ROOT", root) and other.pid not in processes_with("TI_ROOT", root)
        assert end_processes_with("TI_ROOT", root) == 1
        assert own.wait(timeout=10) == -9 and other.poll() is None
    finally:
        for process in (own, other):
            process.kill()
            process.wait()
