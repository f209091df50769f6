"""The local container engine itself: what it needs, how it says what is missing, and that it
leaves nothing behind (training_infra/local/containers.py, scripts/setup_container_engine.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT
from training_infra.local import containers
from training_infra.local.containers import ContainerEngine

SETUP_SCRIPT = ROOT / "scripts" / "setup_container_engine.sh"


def test_unavailable_reason_is_one_line_naming_root_when_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert containers.unavailable_reason() == (
        "the container engine needs root (podman, a registry on port 80, a mount namespace)"
    )


def test_unavailable_reason_names_each_missing_tool_and_the_setup_script(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool in ("podman", "htpasswd") else f"/usr/bin/{tool}")
    assert containers.unavailable_reason() == (
        "podman, htpasswd not installed: run scripts/setup_container_engine.sh as root"
    )


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop to another user")
def test_setup_script_without_root_says_so_in_one_line_and_leaves_the_tests_to_skip():
    result = subprocess.run(
        [shutil.which("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/bash", str(SETUP_SCRIPT)],
        env={"PATH": "/nonexistent"},  # every tool "missing"
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "not root: the docker-runtime tests will be skipped" in result.stdout


@pytest.mark.slow
def test_engine_stop_removes_every_container_and_image_and_stops_the_registry_by_pid(container_engine, tmp_path):
    """A second engine (the session's is busy with the scenarios) with a running container at stop()."""
    engine = ContainerEngine(tmp_path / "engine").start()
    try:
        reference = engine.push_trainer("leftover-check", "v1")
        engine.podman("pull", "--quiet", reference)
        engine.podman("run", "--detach", "--name", "still-running", reference, "sleep", "300")
        assert engine.containers() == ["still-running"]
        registry_pid = engine._registry.pid
    finally:
        engine.stop()
    assert engine.containers() == [] and engine.images() == []
    with pytest.raises(ProcessLookupError):
        os.kill(registry_pid, 0)
