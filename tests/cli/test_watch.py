"""`training-infra watch` (issue 27): a run's history drawn at 80 columns and as a PNG, from the run table and
the metrics.jsonl the agent's MetricsLog writes, in the local AWS's S3, with a spot reclaim in the middle."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from training_infra import naming, pricing
from training_infra.compute.agent.ti_agent.metrics import MetricsLog
from training_infra.compute.agent.ti_agent.progress import Progress, observe, read_heartbeat
from training_infra.supervisor.runtime import ledger
from training_infra.supervisor.runtime.records import Attempt, AttemptEnd, Run, RunSpec, RunState, RunStore, iso

REGION = "eu-west-2"  # this module's own
RUN = "watch-reclaimed"
HOSTILE_RUN = "watch-hostile"
HOSTILE = "\x1b]0;x\x07\x1b[2J"  # OSC 0 (window title) and CSI 2J (clear the screen)
START = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
G5 = pricing.on_demand_price("g5.xlarge")
WHERE = {"subnet_ids": ("subnet-0123456789abcdef0",), "launch_template_id": "lt-0123456789abcdef0",
         "max_runtime_hours": 12}  # fmt: skip


def _agent_history(tmp_path: Path, first_step: int, began: datetime, minutes: int) -> str:
    """metrics.jsonl as the agent writes it: the trainer beats once a minute, the agent observes each beat."""
    beat, log = tmp_path / f"beat-{first_step}", MetricsLog(tmp_path / f"metrics-{first_step}.jsonl", every=10)
    progress = Progress()
    for minute in range(minutes):
        moment = (began + timedelta(minutes=minute)).timestamp()
        step = first_step + minute * 50
        beat.write_text(
            f'{{"step": {step}, "loss": {2.0 / (1 + step / 100):.4f}, "accuracy": {step / (step + 300):.3f}}}'
        )
        os.utime(beat, (moment, moment))
        progress, _ = observe(progress, read_heartbeat(beat), moment + 1, since=began.timestamp() - 60)
        log.record(progress, beat.read_text(), moment + 1, 90.0 + minute % 5)
    return log.path.read_text()


@pytest.fixture(scope="module")
def watched(deployed, tmp_path_factory):
    deployment = deployed(REGION)
    tmp = tmp_path_factory.mktemp("watch")
    second = START + timedelta(minutes=42)
    attempts = [
        Attempt(n=1, instance_id="i-0000000000000001a", instance_type="g5.xlarge", zone=f"{REGION}a", market="spot",
                started_at=iso(START), ended_at=iso(START + timedelta(minutes=40)), end_reason=AttemptEnd.RECLAIMED),
        Attempt(n=2, instance_id="i-0000000000000002b", instance_type="g5.xlarge", zone=f"{REGION}b", market="spot",
                started_at=iso(second), ended_at=iso(second + timedelta(minutes=30)), end_reason=AttemptEnd.SUCCEEDED),
    ]  # fmt: skip
    spec = RunSpec(
        market="spot", instance_types=("g5.xlarge",), list_prices={"g5.xlarge": G5}, max_cost_usd=5.0, **WHERE
    )
    for attempt in attempts:
        ledger.record_price(attempt, ledger.price_attempt(attempt, spec, START + timedelta(hours=2), None))
    store = RunStore(deployment.client("dynamodb"), deployment.outputs[naming.OUTPUT_RUN_TABLE])
    store.create(Run(run_id=RUN, spec=spec, deadline_at=iso(START + timedelta(hours=12)), created_at=iso(START),
                     state=RunState.SUCCEEDED, attempts=attempts, ended_at=attempts[-1].ended_at))  # fmt: skip
    s3 = deployment.client("s3")
    for n, (first, began, minutes) in enumerate([(0, START, 38), (1900, second, 29)], start=1):
        s3.put_object(
            Bucket=deployment.outputs_bucket,
            Key=f"{naming.RUNS_PREFIX}{RUN}/attempts/{n}/logs/metrics.jsonl",
            Body=_agent_history(tmp, first, began, minutes).encode(),
        )
    # A hostile instance writes the history itself (not through the agent's filter): names that would retitle
    # the window and clear the screen if printed.
    hostile = Attempt(n=1, instance_id="i-0000000000000003c", instance_type="g5.xlarge", zone=f"{REGION}a",
                      market="spot", started_at=iso(START), ended_at=iso(START + timedelta(minutes=5)),
                      end_reason=AttemptEnd.SUCCEEDED)  # fmt: skip
    store.create(Run(run_id=HOSTILE_RUN, spec=spec, deadline_at=iso(START + timedelta(hours=12)), created_at=iso(START),
                     state=RunState.SUCCEEDED, attempts=[hostile], ended_at=hostile.ended_at))  # fmt: skip
    lines = [
        json.dumps(
            {"t": iso(START + timedelta(minutes=m)), "step": m, HOSTILE: 1.0 + m, f"loss{HOSTILE}": 2.0 - m / 10}
        )
        for m in range(5)
    ]
    s3.put_object(
        Bucket=deployment.outputs_bucket,
        Key=f"{naming.RUNS_PREFIX}{HOSTILE_RUN}/attempts/1/logs/metrics.jsonl",
        Body="\n".join(lines).encode(),
    )
    return deployment


def test_watch_once_at_80_columns_draws_the_curves_and_marks_the_preemption(watched):
    result = watched.cli("watch", RUN, "--once", env={"COLUMNS": "80"})

    assert result.exit_code == 0, result.output
    text = result.stdout
    print(text)  # a person looks at it: pytest -s shows the view
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "\x1b" not in text, "no colour codes in a pipe"
    summary = " ".join(lines[:2])  # wrapped at 80
    assert summary.startswith(f"run {RUN}: succeeded, step 3300, 0.833 steps/s, $1.17 of $5.00, 1 preemption(s)")
    for title in ("step", "loss", "accuracy", "steps per second", "GPU use, %", "USD spent (limit $5.00)"):
        assert re.search(rf"^ +{re.escape(title)} +$", text, re.MULTILINE), f"chart {title!r}"
    curve = [line for line in lines if re.search(r"[▖▗▘▙▚▛▜▝▞▟▀▄▌▐█]{3,}", line)]
    assert len(curve) > 10, "the curves are drawn, not empty frames"
    marks = "attempt 1 at 0 min, preempted at 40 min, attempt 2 at 42 min"
    legend = "minutes since " + " ".join(text.rsplit("minutes since", 1)[1].split())  # wrapped at 80
    assert legend == f"minutes since the first attempt started; marks (▐ an attempt starts, x a spot reclaim): {marks}"
    # The reclaim (40 min, drawn with x) and the second attempt's start (42 min, a block line): two vertical
    # marks on every chart, told apart by their character.
    assert sum(bool(re.search(r"x +[▌▐]", line)) for line in lines) >= 6 * 2


def test_watch_png_writes_the_same_view_as_a_picture(watched, tmp_path):
    picture = tmp_path / "watch.png"

    result = watched.cli("watch", RUN, "--png", str(picture))

    assert result.exit_code == 0, result.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 20_000
    assert result.stdout.startswith(f"wrote {picture} (")
    keep = os.environ.get("TI_KEEP_WATCH_PNG")  # a person looks at it before resolving the issue
    if keep:
        Path(keep).write_bytes(picture.read_bytes())


def test_the_png_has_a_legend_line_telling_a_restart_from_a_reclaim(watched, monkeypatch):
    from training_infra.cli import watching
    from training_infra.cli.aws import Aws

    for name, value in watched.env.items():
        monkeypatch.setenv(name, value)
    view = watching.load(Aws(REGION), RUN)
    figure = watching.build_figure(view, watching.charts(view))

    [legend] = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["an attempt starts", "spot reclaim (preempted)"]


def test_watch_every_below_10_seconds_is_refused_in_one_line(watched):
    result = watched.cli("watch", RUN, "--every", "5")

    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: option '--every': got '5'; allowed: at least 10 seconds (each refresh reads the run table, EC2 and S3)"
    ]
    assert result.stdout == ""


def test_watch_of_a_run_without_a_record_is_one_line(watched):
    watched.put_status({"run_id": "watch-legacy", "outcome": "succeeded"})

    result = watched.cli("watch", "watch-legacy", "--once")

    assert result.exit_code == 1
    assert result.stderr == (
        "error: run watch-legacy has no run record (made before the run table): `watch` needs a managed run\n"
    )


def test_watch_never_prints_an_escape_sequence_from_a_metric_name(watched):
    result = watched.cli("watch", HOSTILE_RUN, "--once", env={"COLUMNS": "80"})

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "]0;x" not in result.stdout and "[2J" not in result.stdout, "no parameter bytes left behind either"
    assert re.search(r"^ +loss +$", result.stdout, re.MULTILINE), "the name without its escape sequence is drawn"
