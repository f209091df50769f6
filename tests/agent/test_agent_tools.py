"""agent_tools.py, the agent's Python helpers, as units: log batches for CloudWatch and status.json.

The scenario tests run the same file on the "instance" (unpacked from the user data); these pin the
edge cases a scenario rarely hits: partial lines, blank lines, batch limits, a trainer that never ran.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from training_infra.compute.agent import agent_tools
from training_infra.compute.user_data import AGENT_DIR

TOOLS = AGENT_DIR / "agent_tools.py"


def test_log_batch_holds_back_a_line_still_being_written_until_the_final_flush(tmp_path):
    log = tmp_path / "training.log"
    log.write_bytes(b"epoch 1\nepoch 2\nepoch 3 half")
    events, offset = agent_tools.next_log_batch(log, 0, final=False, now_ms=7)
    assert [e["message"] for e in events] == ["epoch 1", "epoch 2"] and offset == len(b"epoch 1\nepoch 2\n")
    assert {e["timestamp"] for e in events} == {7}
    assert agent_tools.next_log_batch(log, offset, final=False, now_ms=8) is None, "nothing complete yet"
    events, end = agent_tools.next_log_batch(log, offset, final=True, now_ms=9)
    assert [e["message"] for e in events] == ["epoch 3 half"] and end == log.stat().st_size


def test_log_batch_skips_blank_lines_but_consumes_their_bytes_and_replaces_bad_utf8(tmp_path):
    log = tmp_path / "training.log"
    log.write_bytes(b"\n   \nloss \xff\r\n\n")
    events, offset = agent_tools.next_log_batch(log, 0, final=False, now_ms=0)
    assert [e["message"] for e in events] == ["loss \ufffd"]
    assert offset == log.stat().st_size


def test_log_batch_stays_inside_cloudwatch_limits_for_many_and_long_lines(tmp_path):
    log = tmp_path / "training.log"
    log.write_bytes(b"x\n" * 12_000 + b"y" * 300_000 + b"\n")
    events, offset = agent_tools.next_log_batch(log, 0, final=False, now_ms=0)
    assert len(events) == agent_tools.BATCH_MAX_EVENTS and offset == 2 * agent_tools.BATCH_MAX_EVENTS
    offset = 2 * 12_000
    events, _ = agent_tools.next_log_batch(log, offset, final=True, now_ms=0)
    assert len(events) == 1 and len(events[0]["message"]) == agent_tools.EVENT_MAX_CHARS
    assert sum(len(e["message"].encode()) + 26 for e in events) < 1_048_576


def test_log_batch_command_commits_nothing_itself_and_ends_with_minus_one(tmp_path):
    """The agent moves OFFSET.next over OFFSET only after put-log-events worked: a failed upload is resent."""
    log, offset_file, batch_file = tmp_path / "training.log", tmp_path / "log.offset", tmp_path / "batch.json"
    log.write_text("a\nb\n")
    argv = [sys.executable, str(TOOLS), "log-batch", str(log), str(offset_file), str(batch_file)]
    assert subprocess.run(argv, capture_output=True, text=True, check=True).stdout == "2\n"
    assert [e["message"] for e in json.loads(batch_file.read_text())] == ["a", "b"]
    assert not offset_file.exists() and (tmp_path / "log.offset.next").read_text() == "4"
    (tmp_path / "log.offset.next").rename(offset_file)
    assert subprocess.run(argv, capture_output=True, text=True, check=True).stdout == "-1\n"


STATUS_ARGS = {
    "run-id": "r1",
    "attempt": "2",
    "outcome": "failed",
    "started-at": "2026-11-29T00:00:00Z",
    "ended-at": "2026-11-29T00:30:00Z",
    "duration-seconds": "1800",
    "instance-id": "i-0abc",
    "instance-type": "g5.xlarge",
    "market": "spot",
    "availability-zone": "us-east-1a",
    "hourly-price-usd": "1.006",
    "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/trainer:v1",
    "message": "-x: a message that looks like an option",
}


@pytest.mark.parametrize(("exit_code", "expected"), [("", None), ("0", 0), ("137", 137)])
def test_status_command_writes_the_documented_fields_and_prints_the_cost(tmp_path, exit_code, expected):
    path = tmp_path / "status.json"
    options = [f"--{name}={value}" for name, value in {**STATUS_ARGS, "exit-code": exit_code}.items()]
    printed = subprocess.run(
        [sys.executable, str(TOOLS), "status", str(path), *options], capture_output=True, text=True, check=True
    ).stdout
    status = json.loads(path.read_text())
    assert status["exit_code"] == expected, "empty means the trainer never started: null"
    assert status["estimated_cost_usd"] == 0.503 and printed == "0.503\n", "1.006 USD/h for half an hour"
    assert (status["duration_seconds"], status["hourly_price_usd"]) == (1800, 1.006)
    assert status["message"] == STATUS_ARGS["message"]
    assert status["attempt"] == 2, "the attempt number as a JSON number"
    assert list(status) == [
        "run_id", "attempt", "outcome", "exit_code", "started_at", "ended_at", "duration_seconds", "instance_id",
        "instance_type", "market", "availability_zone", "hourly_price_usd", "estimated_cost_usd", "image", "message",
    ]  # fmt: skip


def test_status_command_refuses_a_missing_field_with_usage_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TOOLS), "status", str(tmp_path / "s.json"), "--run-id=r1"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "the following arguments are required" in result.stderr
    assert not (tmp_path / "s.json").exists()


def test_tools_use_only_the_standard_library():
    """The instance's python3 has no boto3 or third-party packages: the helpers must not import any."""
    probe = "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]; import runpy; "
    probe += f"runpy.run_path({str(TOOLS)!r}, run_name='not_main')"
    subprocess.run([sys.executable, "-I", "-c", probe], check=True)
