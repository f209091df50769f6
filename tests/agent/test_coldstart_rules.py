"""The cold start's rules (issue 29) without an agent run: the parallel runner, the pull mode, the
mount's cache and check, and `data_access` refused in one line wherever it is given."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from training_infra import config
from training_infra.compute.agent.ti_agent import coldstart, settings
from training_infra.compute.agent.ti_agent.coldstart import ColdStartFailed, Part, run_parts
from training_infra.supervisor.runtime.run_requests import LaunchRequest, Refused


def test_parts_run_at_once_so_the_total_is_the_slowest_part():
    result = run_parts(
        {Part.IMAGE: lambda: time.sleep(1.5), Part.DATA: lambda: time.sleep(1.0), Part.CHECKPOINTS: lambda: None},
        log=lambda _: None,
    )
    record = result.record()
    assert record["slowest"] == "image" and record["failed"] is None
    assert record["parts"]["image"] >= 1.5 and record["parts"]["data"] >= 1.0
    assert result.seconds <= 1.1 * result.slowest.seconds
    assert "image 1." in result.summary() and "one after another: 2." in result.summary()


def test_a_failed_part_ends_the_others_subprocesses_and_names_itself(tmp_path: Path):
    pid_file = tmp_path / "sleep.pid"

    def long_pull() -> None:
        sleeper = subprocess.Popen(["sleep", "60"])  # what `docker pull` would be
        pid_file.write_text(str(sleeper.pid))
        sleeper.wait()

    def failing_sync() -> None:
        while not pid_file.exists():
            time.sleep(0.05)
        raise RuntimeError("could not sync s3://data/data/\nafter 4 attempts")

    said: list[str] = []
    began = time.monotonic()
    with pytest.raises(ColdStartFailed) as failed:
        run_parts({Part.IMAGE: long_pull, Part.DATA: failing_sync}, log=said.append)
    assert time.monotonic() - began < 20  # not the 60 s the pull would take
    assert str(failed.value) == "cold start: data failed: could not sync s3://data/data/ after 4 attempts"
    assert failed.value.result.record()["failed"] == "data"
    assert said == ["data failed: stopping image"]
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def fake_engine(tmp_path: Path, driver: str) -> str:
    docker = tmp_path / "docker"
    docker.write_text(f"#!/bin/sh\necho {driver}\n")
    docker.chmod(0o755)
    return str(docker)


def test_pull_is_lazy_only_where_the_engine_store_is_the_soci_snapshotter(tmp_path: Path):
    lazy = coldstart.pull_mode(fake_engine(tmp_path, "soci"), env=os.environ)
    assert lazy.lazy and lazy.why.startswith("lazy pull: ")
    (tmp_path / "docker").unlink()
    plain = coldstart.pull_mode(fake_engine(tmp_path, "overlay2"), env=os.environ, socket=tmp_path / "none.sock")
    assert not plain.lazy
    assert plain.why.endswith("storage driver is 'overlay2', not soci (soci snapshotter not running)")
    missing = coldstart.pull_mode(str(tmp_path / "no-docker"), env=os.environ)
    assert not missing.lazy and "did not answer" in missing.why


def test_mount_cache_is_on_the_instance_store_when_there_is_one_else_the_volume(tmp_path: Path):
    # /proc is a mount point on every Linux box: it plays the instance store's mount here.
    store = coldstart.mount_cache("", instance_store=Path("/proc"), volume_dir=tmp_path)
    assert store == Path("/proc/mountpoint-cache")
    assert coldstart.mount_cache("", instance_store=tmp_path / "nvme", volume_dir=tmp_path) == (
        tmp_path / "mountpoint-cache"
    )


def test_a_folder_that_is_no_mount_fails_the_check_in_one_line(tmp_path: Path):
    assert coldstart.check_mount(tmp_path) == f"{tmp_path} is not a mount point"


def test_data_access_is_refused_in_one_line_by_the_agent_the_settings_and_launch():
    environ = {"TI_DATA_BUCKET": "d", "TI_OUTPUTS_BUCKET": "o", "TI_IMAGE_URI": "i", "TI_DATA_ACCESS": "copy"}
    with pytest.raises(settings.SettingError, match=r"^TI_DATA_ACCESS='copy' is not allowed: use one of sync mount$"):
        settings.parse(environ)
    assert settings.parse({**environ, "TI_DATA_ACCESS": ""}).config.data_access == "sync"
    with pytest.raises(config.ConfigError, match=r"data_access.*'copy'.*sync or mount"):
        config.parse_settings({"data_access": "copy"})
    event = {"run_id": "r1", "market": "spot", "data_access": "copy"}
    with pytest.raises(Refused, match=r"^option '--data-access': got 'copy'; allowed: sync, mount$"):
        LaunchRequest.from_event(event)
    assert LaunchRequest.from_event({**event, "data_access": "mount"}).data_access == "mount"
