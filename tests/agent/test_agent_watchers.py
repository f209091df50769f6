"""The agent's watchers and IMDS client as units: a fake clock, the fake IMDS on loopback, no AWS.

Each watcher's `tick` is one look; the test moves the clock and says what the watcher must ask for.
The first stop reason wins, whoever asks second.
"""

from __future__ import annotations

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
