"""The agent's watchers and IMDS client as units: a fake clock, the fake IMDS on loopback, no AWS.

Each watcher's `tick` is one look; the test moves the clock and says what the watcher must ask for.
The first stop reason wins, whoever asks second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from training_infra.compute.agent.ti_agent import settings
from training_infra.compute.agent.ti_agent.agent import Agent
from training_infra.compute.agent.ti_agent.imds import Imds
from training_infra.compute.agent.ti_agent.status import Outcome
from training_infra.compute.agent.ti_agent.watchers import (
    IdleWatcher,
    ProgressWatcher,
    SpotWatcher,
    StopTagWatcher,
    busiest_gpu,
    deadline_stop_at,
)
from training_infra.local.imds import FakeImds


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeCheckpoints:
    def __init__(self) -> None:
        self.syncs = 0

    def sync(self) -> bool:
        self.syncs += 1
        return True


@pytest.fixture
def imds():
    with FakeImds() as server:
        yield server


def make_agent(tmp_path: Path, imds: FakeImds, clock: Clock, **env: str) -> Agent:
    environ = {
        "TI_ROOT": str(tmp_path),
        "TI_DATA_BUCKET": "d",
        "TI_OUTPUTS_BUCKET": "o",
        "TI_IMAGE_URI": "i",
        "TI_RUNTIME": "process",
        "TI_TRAINING_COMMAND": "true",
        "TI_STOP_GRACE_SECONDS": "60",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url,
        **env,
    }
    agent = Agent(environ, clock=clock)
    agent.settings = settings.parse(environ)
    agent.log_dir.mkdir(parents=True)
    agent.train_log.touch()
    agent.checkpoints = FakeCheckpoints()
    agent.run_id = "r1"
    return agent


def test_a_spot_notice_asks_for_an_interrupted_stop_with_the_grace_capped_to_leave_time_to_flush(tmp_path, imds):
    agent = make_agent(tmp_path, imds, Clock(), TI_STOP_GRACE_SECONDS="300")
    spot = SpotWatcher(agent)
    assert spot.every == 1, "IMDS is polled each second by default"
    assert spot.tick() is False and agent.stop_reason is None
    imds.inject_spot_interruption()
    assert spot.tick() is True
    assert (agent.stop_reason.outcome, agent.stop_reason.grace) == (Outcome.INTERRUPTED, 80)
    assert agent.stop_reason.message.startswith("spot interruption notice {")
    assert agent.stopped.is_set()


def test_the_first_stop_reason_wins_and_a_later_one_changes_nothing(tmp_path, imds):
    agent = make_agent(tmp_path, imds, Clock())
    imds.set_tag("training-infra:stop", "budget")
    assert StopTagWatcher(agent).tick() is True
    imds.inject_spot_interruption()
    assert SpotWatcher(agent).tick() is True
    assert agent.stop_reason.outcome is Outcome.BUDGET
    assert agent.train_log.read_text().count("stopping the trainer") == 1


@pytest.mark.parametrize(
    ("value", "outcome", "shown"),
    [("user", Outcome.STOPPED, "user"), ("stall", Outcome.STALLED, "stall"), ("x y/z", Outcome.STOPPED, "x?y?z")],
)
def test_the_stop_tag_names_the_outcome_and_never_logs_raw_characters(tmp_path, imds, value, outcome, shown):
    agent = make_agent(tmp_path, imds, Clock())
    watcher = StopTagWatcher(agent)
    assert watcher.tick() is False, "404: no tag, no stop"
    imds.set_tag("training-infra:stop", value)
    watcher.tick()
    assert agent.stop_reason.outcome is outcome
    assert agent.stop_reason.message == f"stop requested (tag training-infra:stop={shown})"


def test_a_rebalance_without_stop_on_rebalance_syncs_once_and_the_spot_notice_still_stops(tmp_path, imds):
    agent = make_agent(tmp_path, imds, Clock(), TI_STOP_ON_REBALANCE="false")
    spot = SpotWatcher(agent)
    imds.inject_rebalance()
    assert spot.tick() is False and spot.tick() is False, "training goes on"
    for thread in __import__("threading").enumerate():
        if thread.name == "RebalanceSync":
            thread.join(5)
    assert agent.checkpoints.syncs == 1, "one sync for one recommendation"
    assert "checkpoints synced after the rebalance recommendation" in agent.train_log.read_text()
    imds.inject_spot_interruption()
    assert spot.tick() is True and agent.stop_reason.outcome is Outcome.INTERRUPTED


def test_idle_needs_the_busiest_gpu_below_the_threshold_for_the_whole_window(tmp_path, imds):
    clock = Clock()
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncat " + str(tmp_path / "util") + "\n")
    smi.chmod(0o755)
    (tmp_path / "util").write_text("1\n2\n")
    agent = make_agent(tmp_path, imds, clock, TI_IDLE_SECONDS="60", TI_NVIDIA_SMI=str(smi))
    agent.put_metrics = lambda metrics, warning: None
    idle = IdleWatcher(agent)
    assert idle.every == 15
    idle.tick()
    clock.now += 45
    (tmp_path / "util").write_text("1\n90\n")  # one busy GPU of two: not idle, the window starts again
    assert idle.tick() is False
    (tmp_path / "util").write_text("0\n0\n")
    clock.now += 15
    assert idle.tick() is False
    clock.now += 59
    assert idle.tick() is False
    clock.now += 1
    assert idle.tick() is True
    assert agent.stop_reason.message == "GPU utilisation below 5% for 60s"


def test_busiest_gpu_reads_nvidia_smi_lines_and_says_none_without_a_figure():
    assert busiest_gpu(" 3\n87\n 0\n") == 87
    assert busiest_gpu("NVIDIA-SMI has failed\n") is None


def test_no_progress_for_stall_seconds_after_a_beat_collects_diagnostics_then_stops_as_stalled(tmp_path, imds):
    clock = Clock()
    agent = make_agent(tmp_path, imds, clock, TI_STALL_SECONDS="60", TI_HEARTBEAT_FILE=str(tmp_path / "beat"))
    agent.put_metrics = lambda metrics, warning: None
    agent.upload_progress = lambda: None
    agent.trainer_alive = lambda: True
    diagnosed = []
    agent.collect_diagnostics = lambda: diagnosed.append(clock.now)
    agent.trainer_started = clock.now - 10
    watcher = ProgressWatcher(agent)
    clock.now += 300
    assert watcher.tick() is False, "a trainer that never beats is not judged"
    beat = tmp_path / "beat"
    beat.write_text('{"step": 5}')
    import os

    os.utime(beat, (clock.now, clock.now))
    assert watcher.tick() is False
    clock.now += 59
    assert watcher.tick() is False and not diagnosed
    clock.now += 1
    assert watcher.tick() is True and diagnosed == [clock.now]
    assert agent.stop_reason.outcome is Outcome.STALLED
    assert agent.stop_reason.message.endswith("for 60s (last step 5)")


@pytest.mark.parametrize("runtime", ["process", "docker"])
def test_a_stall_names_the_heartbeat_path_the_trainer_was_given(tmp_path, imds, runtime):
    """Issue 27: a process-runtime run's stall message named the container's path, which its trainer never saw."""
    agent = make_agent(tmp_path, imds, Clock(), TI_RUNTIME=runtime)

    expected = str(agent.progress_dir / "heartbeat.json") if runtime == "process" else agent.knobs.heartbeat_file
    assert agent.trainer_heartbeat == expected
    assert (runtime == "docker") == expected.startswith("/run/training-infra/progress/")


def test_the_deadline_stop_leaves_grace_and_a_minute_unless_the_attempt_is_too_short_for_it():
    assert deadline_stop_at(10_000, 0, grace=60) == 10_000 - 120
    assert deadline_stop_at(200, 0, grace=60) == 200, "less than twice the margin: no margin"


def test_imds_renews_its_token_when_imds_refuses_it_and_when_it_nears_its_end(imds):
    clock = Clock()
    client = Imds(imds.url, clock=clock)
    assert client.get("meta-data/instance-id") == imds.instance_id
    imds._tokens.clear()  # noqa: SLF001 - the token expired on IMDS's side
    assert client.get("meta-data/instance-id") == imds.instance_id, "401, a new token, the same answer"
    puts = len([r for r in imds.requests if r.method == "PUT"])
    clock.now += 3 * 3600  # half the 6-hour TTL
    client.get("meta-data/instance-id")
    assert len([r for r in imds.requests if r.method == "PUT"]) == puts + 1
    assert client.get("meta-data/spot/instance-action") is None, "404: no notice"


def test_the_agents_clients_use_the_instance_roles_credentials_from_imdsv2_and_renew_them(monkeypatch):
    """On the box there are no keys in the environment: botocore reads the role's from IMDS (token first),
    at AWS_EC2_METADATA_SERVICE_ENDPOINT, and reads them again when they near their expiry."""
    import datetime

    # As on the box: nothing in this process's environment (other tests' emulators) may answer first.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_EC2_METADATA_DISABLED", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")

    from training_infra.compute.agent.ti_agent.aws import Aws

    def document(key: str, minutes: int) -> dict[str, str]:
        expiration = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=minutes)
        return {"AccessKeyId": key, "SecretAccessKey": "s", "Token": "t",
                "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    with FakeImds(role=("training-instance", document("KEY-1", 60))) as server:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", server.url)
        credentials = Aws(region="eu-west-1", environ={}).client("logs")._request_signer._credentials  # noqa: SLF001
        first = credentials.get_frozen_credentials()
        assert (first.access_key, first.secret_key, first.token) == ("KEY-1", "s", "t")
        assert server.requests_for("api/token"), "IMDSv2: a token before the role's credentials"
        server.role = ("training-instance", document("KEY-2", 60))
        assert credentials.get_frozen_credentials().access_key == "KEY-1", "cached while far from its expiry"
        server.role = ("training-instance", document("KEY-3", 60))
        credentials._expiry_time = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=4)  # noqa: SLF001
        assert credentials.get_frozen_credentials().access_key == "KEY-3", "near its expiry: read again"


# ---------------------------------------------------------------- robustness: nothing stops the end of an attempt


class Done:
    def __init__(self, code: int = 0, stdout: str = "", stderr: str = "") -> None:
        self.returncode, self.stdout, self.stderr = code, stdout, stderr

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class FakeAws:
    """Every AWS call answers yes and is recorded: these tests are about the agent, not AWS."""

    region = "us-east-1"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def cli(self, *args: str, **_: object) -> Done:
        self.calls.append(args)
        return Done()

    def cli_env(self, extra=None) -> dict[str, str]:
        return {}

    def put_object(self, bucket: str, key: str, body: bytes) -> None:
        self.calls.append(("put_object", bucket, key))

    def put_metrics(self, namespace, metrics) -> None:
        self.calls.append(("put_metrics", namespace))

    def create_log_stream(self, group: str, stream: str) -> None:
        self.calls.append(("create_log_stream", group, stream))

    def put_log_events(self, group: str, stream: str, events) -> None:
        self.calls.append(("put_log_events", group, stream))


@pytest.fixture
def restored_process_hooks():
    """Agent.main installs signal handlers and threading.excepthook: give the test process its own back."""
    import signal
    import threading

    saved = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), threading.excepthook)
    yield
    signal.signal(signal.SIGTERM, saved[0])
    signal.signal(signal.SIGINT, saved[1])
    threading.excepthook = saved[2]


def _ended_agent(tmp_path: Path, imds: FakeImds, **env: str) -> Agent:
    """An agent whose run's deadline has passed: it ends before any trainer, straight into finalize."""
    environ = {
        "TI_ROOT": str(tmp_path),
        "TI_DATA_BUCKET": "d",
        "TI_OUTPUTS_BUCKET": "o",
        "TI_IMAGE_URI": "i",
        "TI_RUNTIME": "process",
        "TI_TRAINING_COMMAND": "true",
        "TI_RUN_ID": "r1",
        "TI_DEADLINE_AT": "2020-01-01T00:00:00Z",
        "TI_SHUTDOWN_BIN": "true",
        "TI_RETRY_ATTEMPTS": "1",
        "TI_POWEROFF_CMD": f"echo off >> {tmp_path / 'powered-off'}",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url,
        **env,
    }
    agent = Agent(environ)
    agent.aws = FakeAws()
    return agent


def test_logs_on_a_full_disk_still_end_with_status_json_uploaded_and_the_power_off(
    tmp_path, imds, restored_process_hooks
):
    logs = tmp_path / "var" / "log"
    logs.mkdir(parents=True)
    (logs / "training-setup.log").symlink_to("/dev/full")
    (logs / "training.log").symlink_to("/dev/full")
    agent = _ended_agent(tmp_path, imds)
    assert agent.main() == 0
    assert (tmp_path / "powered-off").read_text() == "off\n"
    status = json.loads((agent.state / "status.json").read_text())
    assert (status["outcome"], status["run_id"]) == ("deadline", "r1")
    assert ("s3", "cp", str(agent.state / "status.json"), "s3://o/runs/r1/attempts/1/status.json",
            "--only-show-errors") in agent.aws.calls  # fmt: skip


def test_a_failing_setup_before_the_run_still_finalizes_and_powers_off(tmp_path, imds, restored_process_hooks):
    """The bootstrap execs the agent: an error in its first steps must not leave the box up until the OS deadline."""
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "training-infra").write_text("a file where the agent's folder goes")
    agent = _ended_agent(tmp_path, imds)
    assert agent.main() == 0
    assert (tmp_path / "powered-off").read_text() == "off\n"
    setup_log = (tmp_path / "var" / "log" / "training-setup.log").read_text()
    assert "agent error:" in setup_log and "powering off" in setup_log


def test_the_power_off_runs_when_finalize_fails_and_the_backstop_powers_off_even_when_logging_fails(tmp_path, imds):
    agent = _ended_agent(tmp_path, imds)

    def broken() -> None:
        raise SystemExit(1)  # not even an Exception

    agent._finalize = broken  # noqa: SLF001
    agent.finalize()
    assert (tmp_path / "powered-off").read_text() == "off\n"

    def no_log(message: str) -> None:
        raise OSError(28, "No space left on device")

    agent.log = no_log
    with pytest.raises(OSError):
        agent._backstop()  # noqa: SLF001
    assert (tmp_path / "powered-off").read_text() == "off\noff\n", "the command ran before the error went on"


def test_a_signal_during_a_log_write_interrupts_the_run_without_a_deadlock(tmp_path):
    """The handler takes no lock: SIGTERM landing while the main thread writes a log line (and holds the
    log lock) ends the run as interrupted; one during finalize is said at the next line, and finalize goes on."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal, sys
        from training_infra.compute.agent.ti_agent.agent import Agent, AgentInterrupted

        agent = Agent({{"TI_ROOT": {str(tmp_path)!r}}})
        agent.log_dir.mkdir(parents=True)
        signal.signal(signal.SIGTERM, agent._on_signal)

        class Echo:  # the agent echoes each line to stdout while it holds the log lock
            def write(self, text):
                os.kill(os.getpid(), signal.SIGTERM)
            def flush(self):
                pass

        sys.stdout = Echo()
        try:
            agent.log("a line")
        except AgentInterrupted as signalled:
            sys.stderr.write(f"interrupted by {{signalled}}, outcome {{agent.outcome.value}}\\n")
        agent.finalizing = True
        agent.log("finalize goes on")
        sys.stdout = sys.__stdout__
        agent.log("the next line")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.stderr == "interrupted by SIGTERM, outcome interrupted\n"
    lines = (tmp_path / "var" / "log" / "training-setup.log").read_text().splitlines()
    assert [line.split(" [agent] ")[1] for line in lines] == [
        "a line",
        "finalize goes on",
        "SIGTERM during finalize: carrying on (the backstop still powers off)",
        "the next line",
    ]


def test_a_stop_whose_note_cannot_be_written_still_stops_the_trainer_and_keeps_its_reason(tmp_path, imds):
    agent = make_agent(tmp_path, imds, Clock())
    agent.train_log.unlink()
    agent.train_log.symlink_to("/dev/full")
    agent.setup_log.symlink_to("/dev/full")
    assert agent.request_stop(Outcome.IDLE, "idle", 5) is True
    assert agent.stopped.is_set() and agent.stop_reason.outcome is Outcome.IDLE
    assert agent.request_stop(Outcome.BUDGET, "budget", 5) is False, "the first reason still wins"


def test_a_watcher_whose_tick_raises_logs_it_once_and_keeps_ticking(tmp_path, imds):
    from training_infra.compute.agent.ti_agent.watchers import Watcher

    agent = make_agent(tmp_path, imds, Clock())

    class Flaky(Watcher):
        every = 0.001

        def __init__(self, agent: Agent) -> None:
            super().__init__(agent)
            self.ticks = 0

        def tick(self) -> bool:
            self.ticks += 1
            if self.ticks < 5:
                raise FileNotFoundError(2, "No such file or directory", "checkpoint-3/model.pt")
            return True

    watcher = Flaky(agent)
    watcher.start()
    watcher.join(10)
    assert not watcher.is_alive() and watcher.ticks == 5
    warnings = [line for line in agent.setup_log.read_text().splitlines() if "Flaky failed" in line]
    assert len(warnings) == 1 and "checkpoint-3/model.pt" in warnings[0], "said once, not once per tick"


def test_the_checkpoint_watcher_survives_a_sync_that_raises_and_syncs_again(tmp_path, imds):
    from training_infra.compute.agent.ti_agent.watchers import CheckpointWatcher

    agent = make_agent(tmp_path, imds, Clock())
    calls = []

    def sync() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", "checkpoint-1")
        agent.halt.set()
        return True

    agent.checkpoints.sync = sync
    agent.check_checkpoint_freshness = lambda: None
    agent.upload_logs = lambda: True
    watcher = CheckpointWatcher(agent)
    watcher.every = 0.001
    watcher.start()
    watcher.join(10)
    assert len(calls) == 2, "the second sync came after the first one raised"


def test_a_periodic_sync_that_finalize_ended_is_no_failed_upload_and_judges_no_freshness(tmp_path, imds):
    """Finalize ends an in-flight periodic upload to run the final sync itself; that sync's failure must
    not read as "uploads are failing" (a false notice on every run whose last checkpoint was mid-upload)."""
    from training_infra.compute.agent.ti_agent.watchers import CheckpointWatcher

    agent = make_agent(tmp_path, imds, Clock())
    judged = []

    def sync_ended_by_finalize() -> bool:
        agent.halt.set()  # finalize: halt, then SIGTERM to the upload's AWS CLI
        return False

    agent.checkpoints.sync = sync_ended_by_finalize
    agent.check_checkpoint_freshness = lambda: judged.append(1)
    agent.upload_logs = lambda: True

    assert CheckpointWatcher(agent).tick() is True
    said = agent.setup_log.read_text() if agent.setup_log.exists() else ""
    assert judged == [] and "periodic checkpoint sync failed" not in said


def test_the_deadline_watcher_stops_at_its_time_on_a_fake_clock(tmp_path, imds):
    from training_infra.compute.agent.ti_agent.watchers import DeadlineWatcher

    clock = Clock()
    agent = make_agent(tmp_path, imds, clock)
    agent.started_epoch, agent.deadline_epoch, agent.deadline_why = clock.now, clock.now + 10_000, "max runtime"
    watcher = DeadlineWatcher(agent)
    assert watcher.tick() is False and watcher.pause() == 60, "looks again within a minute"
    clock.now += 10_000 - 120
    assert watcher.pause() == 0 and watcher.tick() is True
    assert (agent.stop_reason.outcome, agent.stop_reason.message) == (Outcome.DEADLINE, "max runtime reached")


def test_a_trainer_killed_by_a_signal_exits_with_128_plus_the_signal_like_a_shell(tmp_path, imds):
    agent = make_agent(tmp_path, imds, Clock())

    class Killed:
        def poll(self) -> int:
            return -9

        def wait(self) -> int:
            return -9

        def wait_gone(self, seconds: float) -> bool:
            return True

    agent.trainer = Killed()
    agent.wait_for_trainer()
    assert (agent.exit_code, agent.outcome, agent.message) == (137, Outcome.FAILED, "trainer exited with code 137")


def test_a_hung_docker_stop_kills_the_client_and_returns_so_finalize_goes_on(tmp_path, monkeypatch):
    import subprocess

    from training_infra.compute.agent.ti_agent import runtime

    spec = runtime.TrainerSpec(
        command="", image="i", run_id="r", region="us-east-1", data_dir=tmp_path, out_dir=tmp_path,
        ckpt_dir=tmp_path, progress_dir=tmp_path, heartbeat_host=tmp_path / "b", heartbeat_file="/b",
        stop_grace_seconds=1, trainer_env=tmp_path / "e", secrets_env=tmp_path / "s", aws_dir=None,
        train_log=tmp_path / "training.log",
    )  # fmt: skip
    lines: list[str] = []
    trainer = runtime.DockerTrainer(spec, lines.append, lines.append, docker="docker", has_secrets=False)
    trainer._spawn(["sleep", "60"], {})  # noqa: SLF001 - the `docker run` client

    def hung(argv, **kwargs):
        raise subprocess.TimeoutExpired(argv, kwargs.get("timeout"))

    monkeypatch.setattr(runtime.subprocess, "run", hung)
    trainer.stop(1)
    assert trainer.wait_gone(5), "the client is gone"
    assert any("stop did not answer" in line for line in lines)


def test_imds_cut_mid_answer_is_an_imds_error_the_watchers_already_expect(monkeypatch):
    import http.client

    from training_infra.compute.agent.ti_agent import imds as imds_module

    def cut(*args, **kwargs):
        raise http.client.IncompleteRead(b"{", 10)

    monkeypatch.setattr(imds_module.urllib.request, "urlopen", cut)
    with pytest.raises(imds_module.ImdsError, match="did not answer"):
        Imds("http://127.0.0.1:9").get("meta-data/spot/instance-action")


def test_a_thread_that_crashes_leaves_its_traceback_in_the_setup_log(tmp_path, imds, restored_process_hooks):
    import threading

    agent = make_agent(tmp_path, imds, Clock())
    threading.excepthook = agent._thread_error  # noqa: SLF001 - what main installs

    def crash() -> None:
        raise RuntimeError("boom in a thread")

    thread = threading.Thread(target=crash, name="RebalanceSync")
    thread.start()
    thread.join(5)
    text = agent.setup_log.read_text()
    assert "WARNING: RebalanceSync crashed:" in text and "RuntimeError: boom in a thread" in text


def test_the_power_off_commands_own_output_lands_in_the_setup_log(tmp_path, imds):
    agent = _ended_agent(tmp_path, imds, TI_POWEROFF_CMD="echo 'Shutdown scheduled'; echo 'warned' >&2")
    agent.log_dir.mkdir(parents=True)
    agent.power_off()
    text = agent.setup_log.read_text()
    assert "Shutdown scheduled" in text and "warned" in text and agent.powered_off


def test_the_progress_watcher_writes_the_history_into_the_logs_folder_the_log_upload_syncs(tmp_path, imds):
    clock = Clock()
    agent = make_agent(tmp_path, imds, clock, TI_HEARTBEAT_FILE=str(tmp_path / "beat"))
    agent.put_metrics = lambda metrics, warning: None
    agent.upload_progress = lambda: None
    agent.trainer_started = clock.now - 10
    agent.gpu_percent = 87.0
    beat = tmp_path / "beat"
    beat.write_text('{"step": 7, "loss": 0.5}')
    os.utime(beat, (clock.now, clock.now))

    ProgressWatcher(agent).tick()  # issue 27: the history `training-infra watch` draws

    history = agent.state / "logs" / "metrics.jsonl"  # upload_logs syncs this folder to attempts/<n>/logs/
    [line] = [json.loads(text) for text in history.read_text().splitlines()]
    assert (line["step"], line["loss"], line["gpu_percent"]) == (7, 0.5, 87.0)


def test_the_log_upload_syncs_tensorboard_dir_only_when_the_trainer_wrote_one(tmp_path, imds):
    """Issue 27: $TENSORBOARD_DIR (under /outputs) goes to runs/<id>/tensorboard/ with the logs; no folder, no cost."""
    agent = make_agent(tmp_path, imds, Clock())
    agent.run_id = "r1"
    agent.state.mkdir(parents=True)  # as prepare() leaves it
    calls = []
    agent.cli_ok = lambda *args, timeout=None: calls.append(args) or True

    agent.upload_logs()
    assert [c for c in calls if "tensorboard" in " ".join(c)] == [], "no TensorBoard folder: no request"

    (agent.out_dir / "tensorboard" / "train").mkdir(parents=True)
    agent.upload_logs()
    assert calls[-1][:2] == ("s3", "sync") and calls[-1][2] == f"{agent.out_dir / 'tensorboard'}/"
    assert calls[-1][3] == f"{agent.run_prefix}/tensorboard/"
