"""Output that is not a wide terminal (issue 14): 80 columns, piped, a real 80-column terminal, and JSON.

The runs here have long ids and a long outcome, so the full `status` table (about 150 columns)
cannot fit in 80: every cell must still come out whole on one line, with no control characters
when piped. The module has a region of its own, so the listings hold exactly these runs.
"""

from __future__ import annotations

import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from fcntl import ioctl

import pytest

from training_infra import naming, pricing

REGION = "ap-south-1"
LIVE_RUN = "narrow-output-live-run-with-a-long-name-0001"
FAILED_RUN = "narrow-output-failed-run-0002"
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # everything below space but the newline, and DEL
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def narrow(deployed):
    """One live spot run launched by the CLI and one failed run known from its status.json."""
    deployment = deployed(REGION)
    launched = deployment.cli(
        "launch", "--run-id", LIVE_RUN, "--instance-type", "g5.12xlarge", "--max-runtime-hours", "6"
    )
    assert launched.exit_code == 0, launched.output
    deployment.put_status({
        "run_id": FAILED_RUN, "outcome": "failed", "exit_code": 3, "message": "trainer exited 3",
        "started_at": "2026-11-28T08:00:00Z", "ended_at": "2026-11-28T09:30:00Z", "instance_id": "i-0123456789abcdef0",
        "instance_type": "g4dn.xlarge", "market": "on-demand", "availability_zone": f"{REGION}a",
        "hourly_price_usd": pricing.on_demand_price("g4dn.xlarge"),
    })  # fmt: skip
    return deployment


def _cells(rows: list[dict], keys: tuple[str, ...]) -> set[str]:
    return {str(row[key]) for row in rows for key in keys if row.get(key) not in (None, "")}


def _assert_whole_and_clean(text: str, cells: set[str]) -> None:
    assert not _CONTROL.search(text), f"control characters in {text!r}"
    assert "\x1b" not in text
    lines = text.splitlines()
    for cell in cells:
        assert any(cell in line for line in lines), f"{cell!r} is not whole on any line:\n{text}"


STATUS_CELLS = ("run_id", "state", "outcome")
WIDE_CELLS = ("run_id", "instance_id", "instance_type", "market", "state", "deadline", "outcome")


def _line_of(text: str, run_id: str) -> str:
    [line] = [line for line in text.splitlines() if run_id in line]
    return line


@pytest.mark.parametrize("columns", ["80", "250"])
def test_status_is_one_line_per_run_at_80_columns_and_wide_piped_without_control_characters(narrow, columns):
    rows = json.loads(narrow.cli("status", "--output", "json").stdout)
    assert {r["run_id"] for r in rows} == {LIVE_RUN, FAILED_RUN}

    result = narrow.cli("status", env={"COLUMNS": columns})

    assert result.exit_code == 0, result.output
    _assert_whole_and_clean(result.stdout, _cells(rows, STATUS_CELLS) | {"failed (exit 3)"})
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RUN", "STATE", "TRIES", "UPTIME", "COST", "OUTCOME"]
    assert len(lines) == 1 + len(rows), "a header and one line per run"
    assert _line_of(result.stdout, FAILED_RUN).endswith("failed (exit 3)")
    assert "running" in _line_of(result.stdout, LIVE_RUN)


def test_status_output_wide_adds_instance_type_market_and_deadline_on_the_same_line(narrow):
    rows = json.loads(narrow.cli("status", "--output", "json").stdout)

    result = narrow.cli("status", "-o", "wide", env={"COLUMNS": "80"})

    assert result.exit_code == 0, result.output
    _assert_whole_and_clean(result.stdout, _cells(rows, WIDE_CELLS))
    live = next(r for r in rows if r["run_id"] == LIVE_RUN)
    line = _line_of(result.stdout, LIVE_RUN)
    assert all(live[key] in line for key in ("instance_id", "instance_type", "market", "deadline"))
    assert len(result.stdout.splitlines()) == 1 + len(rows)


def test_status_with_standard_run_ids_fits_80_columns():
    """The default columns of a typical run (a generated id, a long outcome) stay within 80."""
    from contextlib import redirect_stdout
    from io import StringIO

    from training_infra.cli.render import print_columns

    out = StringIO()
    with redirect_stdout(out):
        print_columns(
            ["RUN", "STATE", "TRIES", "UPTIME", "COST", "OUTCOME"],
            [["20261128-160000-ab12", "recovering", "12", "6d 23h 59m", "$123.45", "stalled (exit 137)"]],
            right=("TRIES", "UPTIME", "COST"),
        )
    assert max(len(line) for line in out.getvalue().splitlines()) <= 80


def test_cost_at_80_columns_piped_keeps_every_cell_whole_without_control_characters(narrow):
    summary = json.loads(narrow.cli("cost", "--output", "json").stdout)

    result = narrow.cli("cost", env={"COLUMNS": "80"})

    assert result.exit_code == 0, result.output
    cells = _cells(summary["runs"], ("run_id", "instance_type", "market", "price_source"))
    _assert_whole_and_clean(result.stdout, cells | {"total", "saving vs on-demand:"})


def test_outputs_at_80_columns_piped_prints_each_long_value_on_one_line(narrow):
    values = json.loads(narrow.cli("outputs", "--output", "json").stdout)
    assert values["training_bucket"] == narrow.data_bucket

    result = narrow.cli("outputs", env={"COLUMNS": "80"})

    assert result.exit_code == 0, result.output
    assert any(len(f"{k} = {v}") > 80 for k, v in values.items()), "a value longer than the screen is part of the test"
    _assert_whole_and_clean(result.stdout, {f"{name} = {value}" for name, value in values.items()})


def _on_a_terminal(narrow, *argv: str, columns: int = 80) -> str:
    """Run the real command on a pseudo-terminal of `columns` x 40, as a user at a terminal would."""
    leader, follower = pty.openpty()
    ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {
        k: v
        for k, v in {**os.environ, **narrow.env}.items()
        if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TERM")
    }
    env["TERM"] = "xterm-256color"
    process = subprocess.Popen(
        [sys.executable, "-m", "training_infra", *argv], stdin=follower, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=60) == 0, b"".join(chunks).decode(errors="replace")
    return _ANSI.sub("", b"".join(chunks).decode().replace("\r\n", "\n"))


def test_status_on_an_80_column_terminal_never_breaks_a_cell(narrow):
    rows = json.loads(narrow.cli("status", "--output", "json").stdout)

    shown = _on_a_terminal(narrow, "status")

    _assert_whole_and_clean(shown, _cells(rows, STATUS_CELLS))
    assert len([line for line in shown.splitlines() if line.strip()]) == 1 + len(rows)


@pytest.mark.parametrize("verb", ["status", "cost", "outputs"])
def test_output_json_is_the_aws_cli_convention_and_parses(narrow, verb):
    result = narrow.cli(verb, "-o", "json")

    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), list if verb == "status" else dict)


def test_output_json_of_one_output_name_is_an_object(narrow):
    result = narrow.cli("outputs", "outputs_bucket", "--output", "json")

    assert json.loads(result.stdout) == {"outputs_bucket": narrow.outputs_bucket}


def test_the_older_json_flag_still_prints_json(narrow):
    assert json.loads(narrow.cli("status", LIVE_RUN, "--json").stdout)[0]["run_id"] == LIVE_RUN


def test_an_unknown_output_format_is_a_one_line_usage_error(narrow):
    assert "option '--output': got 'yaml'; allowed: table, wide, json" in narrow.usage_error("status", "-o", "yaml")
    assert "option '--output': got 'wide'; allowed: table, json" in narrow.usage_error("cost", "-o", "wide")


def test_upload_and_fetch_piped_print_no_progress_bar(narrow, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_bytes(b"x\n" * 1000)

    uploaded = narrow.cli("upload", str(tmp_path / "data"), env={"COLUMNS": "80"})
    narrow.client("s3").put_object(
        Bucket=narrow.outputs_bucket, Key=f"{naming.RUNS_PREFIX}{FAILED_RUN}/outputs/m.bin", Body=b"m"
    )
    fetched = narrow.cli("fetch", FAILED_RUN, str(tmp_path / "got"), env={"COLUMNS": "80"})

    assert uploaded.exit_code == 0 and fetched.exit_code == 0, uploaded.output + fetched.output
    assert uploaded.stderr == ""
    assert "━" not in fetched.stderr and "upload to" not in uploaded.stderr and "fetch s3://" not in fetched.stderr
    # The summary line keeps its S3 URL whole even at 80 columns.
    assert f"-> s3://{narrow.data_bucket}/{naming.DATA_PREFIX}" in uploaded.stdout.splitlines()[0]
    _assert_whole_and_clean(
        uploaded.stdout + fetched.stdout, {f"s3://{narrow.outputs_bucket}/{naming.RUNS_PREFIX}{FAILED_RUN}/"}
    )


def test_upload_on_a_terminal_shows_the_progress_bar(narrow, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "b.csv").write_bytes(b"y\n" * 1000)

    shown = _on_a_terminal(narrow, "upload", str(tmp_path / "data"), columns=120)

    assert "upload to s3://" in shown and "━" in shown
