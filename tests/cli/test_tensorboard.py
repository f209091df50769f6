"""`training-infra tensorboard` (issue 27): the run's TensorBoard logs synced from the local AWS's S3 and served
by a real TensorBoard on loopback, whose HTTP page and scalar data are fetched."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from training_infra import naming

pytest.importorskip("tensorboard", reason="the tensorboard extra (requirements-dev.txt installs it)")

RUN = "board-run"  # in the shared deployment: only S3 objects under its own run id


def _events(folder: Path) -> list[Path]:
    """A real events file, as a trainer's SummaryWriter writes it into $TENSORBOARD_DIR/train."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(folder / "train"))
    for step in range(5):
        value = summary_pb2.Summary.Value(tag="loss", simple_value=1.0 / (step + 1))
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=[value])))
    writer.close()
    return sorted((folder / "train").iterdir())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, deadline: float) -> bytes:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - loopback
                return answer.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_tensorboard_syncs_the_runs_logs_and_serves_them_on_loopback(stacks, tmp_path):
    deployment = stacks
    for path in _events(tmp_path / "written"):
        deployment.client("s3").put_object(
            Bucket=deployment.outputs_bucket,
            Key=f"{naming.RUNS_PREFIX}{RUN}/tensorboard/train/{path.name}",
            Body=path.read_bytes(),
        )
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training_infra",
            "tensorboard",
            RUN,
            "--dir",
            str(tmp_path / "got"),
            "--port",
            str(port),
        ],
        env={**os.environ, **deployment.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the command and the TensorBoard it started: one group, stopped together below
    )
    try:
        deadline = time.monotonic() + 120
        page = _get(f"http://127.0.0.1:{port}/", deadline)
        assert b"<tf-tensorboard" in page or b"TensorBoard" in page
        scalars = _get(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", deadline)
        assert "loss" in json.loads(scalars)["train"], scalars
    finally:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
        out, _ = process.communicate(timeout=60)
    assert out.startswith("synced 1 file(s), ")
    assert f"TensorBoard at http://127.0.0.1:{port}/ (Ctrl-C to stop)" in out
    assert list((tmp_path / "got" / "train").iterdir()), "the events file was synced down"


def test_tensorboard_of_a_run_without_logs_says_where_they_come_from(stacks):
    stacks.put_status({"run_id": "board-none", "outcome": "succeeded"})

    result = stacks.cli("tensorboard", "board-none")

    assert result.exit_code == 1
    assert "run board-none has no TensorBoard logs (s3://" in result.stderr and "$TENSORBOARD_DIR" in result.stderr
