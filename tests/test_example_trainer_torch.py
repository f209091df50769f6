"""The PyTorch example trainer on its own (single process): DCP steps with the node marker, the
heartbeat, SIGTERM saves and exits 143, and the next start resumes from the newest complete step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "examples" / "trainer" / "train_torch.py"


def start(tmp_path: Path, **env: str) -> subprocess.Popen:
    environ = {
        **os.environ,
        "DATA_DIR": str(ROOT / "examples" / "data"),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "HEARTBEAT_FILE": str(tmp_path / "beat.json"),
        **env,
    }
    log = open(tmp_path / "training.log", "a")  # noqa: SIM115 - the child holds it
    return subprocess.Popen([sys.executable, str(TRAINER)], env=environ, stdout=log, stderr=subprocess.STDOUT)


def test_the_torch_trainer_saves_on_sigterm_and_resumes_from_the_newest_complete_step(tmp_path):
    trainer = start(tmp_path, STEPS="1000", STEP_SECONDS="0.05", CHECKPOINT_EVERY="4", KEEP_CHECKPOINTS="2")
    beat = tmp_path / "beat.json"
    deadline = time.monotonic() + 120
    while not (beat.exists() and json.loads(beat.read_text())["step"] >= 6):
        assert trainer.poll() is None and time.monotonic() < deadline, (tmp_path / "training.log").read_text()
        time.sleep(0.1)
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=60) == 143
    log = (tmp_path / "training.log").read_text()
    heartbeat = json.loads(beat.read_text())
    stopped = heartbeat["step"]
    assert heartbeat["metrics"]["loss"] == heartbeat["loss"], "the heartbeat carries metrics for the agent"
    folder = tmp_path / "ckpt"
    kept = sorted(p.name for p in folder.iterdir())
    assert kept[-1] == f"step-{stopped:06d}" and len(kept) == 2, f"saved on SIGTERM, the newest 2 kept: {kept}"
    assert {p.name for p in (folder / kept[-1]).iterdir()} >= {".metadata", ".node-0.done", "__0_0.distcp"}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["interrupted"] is True
    # An incomplete newer step (no marker: the save was cut) is not resumed from.
    (folder / f"step-{stopped + 4:06d}").mkdir()
    (folder / f"step-{stopped + 4:06d}" / ".metadata").write_bytes(b"half")
    again = start(tmp_path, STEPS=str(stopped + 2), STEP_SECONDS="0")
    assert again.wait(timeout=120) == 0, (tmp_path / "training.log").read_text()[len(log) :]
    resumed = (tmp_path / "training.log").read_text()[len(log) :]
    assert f"resumed from step-{stopped:06d} (step {stopped})" in resumed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == stopped and metrics["steps_completed"] == stopped + 2
