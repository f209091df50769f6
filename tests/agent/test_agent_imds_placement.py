"""The IMDS block's last check (issue 25, second review): once the gang's container runs, its init must be in the
cgroup the IMDS rule matches; the probe only proves the rule, not that the engine honoured --cgroup-parent."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

from training_infra.compute.agent.ti_agent import gang, imds_block
from training_infra.compute.agent.ti_agent.imds_block import BlockError

HYBRID = "12:pids:/docker/abc\n1:name=systemd:/docker/abc\n0::/training_infra_trainer/abc\n"


def engine(pids: list[str]):
    """A container engine whose `inspect .State.Pid` answers each of `pids` in turn (then the last again)."""
    asked = []

    def run(argv, **_):
        asked.append(argv)
        return subprocess.CompletedProcess(argv, 0, pids[min(len(asked), len(pids)) - 1] + "\n", "")

    return run, asked


def proc_with(tmp_path, pid: str, text: str):
    (tmp_path / pid).mkdir()
    (tmp_path / pid / "cgroup").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("text", "path"),
    [(HYBRID, "/training_infra_trainer/abc"), ("0::/training_infra_trainer.slice/docker-1.scope\n",
                                               "/training_infra_trainer.slice/docker-1.scope"),
     ("4:memory:/x\n", None)],
)  # fmt: skip
def test_the_unified_hierarchys_path_is_read_from_proc_cgroup_on_v2_and_hybrid_hosts(text, path):
    assert imds_block.cgroup_v2_path(text) == path


@pytest.mark.parametrize(
    ("parent", "text"),
    [("/training_infra_trainer", HYBRID),
     ("/training_infra_trainer.slice", "0::/training_infra_trainer.slice/docker-9f.scope\n")],
)  # fmt: skip
def test_a_container_the_engine_put_under_the_blocked_parent_passes_after_its_pid_appears(tmp_path, parent, text):
    run, asked = engine(["0", "0", "4242"])  # inspect answers 0 until the container's init runs
    proc = proc_with(tmp_path, "4242", text)
    path = imds_block.check_container("docker", "trainer", parent, run=run, proc=proc, sleep=lambda _: None)
    assert path == imds_block.cgroup_v2_path(text) and len(asked) == 3
    assert asked[0] == ["docker", "inspect", "--format", "{{.State.Pid}}", "trainer"]


@pytest.mark.parametrize(
    "text",
    ["0::/system.slice/docker-9f.scope\n", "0::/training_infra_trainer.slice-other/x\n", "3:cpu:/docker/x\n"],
)
def test_a_container_outside_the_blocked_parent_fails_closed_in_one_line(tmp_path, text):
    run, _ = engine(["77"])
    proc = proc_with(tmp_path, "77", text)
    with pytest.raises(BlockError) as raised:
        imds_block.check_container("docker", "t", "/training_infra_trainer.slice", run=run, proc=proc,
                                   sleep=lambda _: None)  # fmt: skip
    message = str(raised.value)
    assert "not under /training_infra_trainer.slice where IMDS is blocked: it is stopped" in message
    assert "\n" not in message


def test_an_engine_that_never_tells_the_containers_pid_fails_closed(tmp_path):
    run, asked = engine(["0"])
    with pytest.raises(BlockError, match="gave no pid for the trainer container"):
        imds_block.check_container("podman", "t", "/p", run=run, proc=tmp_path, attempts=5, sleep=lambda _: None)
    assert len(asked) == 5


class Trainer:
    def __init__(self):
        self.stopped = []

    def stop(self, grace):
        self.stopped.append(grace)


def _agent():
    return SimpleNamespace(
        knobs=SimpleNamespace(docker="docker"), aws=SimpleNamespace(cli_env=lambda: {}), trainer=Trainer(),
        log=lambda _: None,
    )  # fmt: skip


def test_the_agent_stops_a_misplaced_container_at_once_and_fails_the_attempt(monkeypatch):
    agent = _agent()

    def misplaced(*_, **__):
        raise BlockError("the engine put the trainer container in cgroup /x, not under /p where IMDS is blocked")

    monkeypatch.setattr(imds_block, "check_container", misplaced)
    with pytest.raises(BlockError):
        gang.check_placement(agent, ("--network", "host", "--cgroup-parent", "/p", "--cap-drop", "NET_RAW"), "c")
    assert agent.trainer.stopped == [0]


def test_a_container_without_the_block_is_not_checked(monkeypatch):
    """The process runtime (tests, the sandbox's default) and single-node runs start no block: nothing to check."""
    monkeypatch.setattr(imds_block, "check_container", lambda *_, **__: pytest.fail("checked"))
    gang.check_placement(_agent(), ("--network", "host"), "c")
    gang.check_placement(_agent(), (), "c")


def test_the_check_reads_the_parent_as_the_engine_was_given_it(monkeypatch):
    seen = {}
    monkeypatch.setattr(imds_block, "check_container", lambda docker, name, parent, **_: seen.update(p=parent) or "/")
    gang.check_placement(_agent(), ("--cgroup-parent", "training_infra_trainer.slice"), "c")
    assert seen["p"] == "/training_infra_trainer.slice"
