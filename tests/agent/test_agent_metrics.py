"""The attempt's metrics history (issue 27): one line per heartbeat change, rate-limited, numbers only."""

from __future__ import annotations

import json

from training_infra.compute.agent.ti_agent.metrics import MAX_FIELDS, MetricsLog, numeric_fields
from training_infra.compute.agent.ti_agent.progress import Progress


def test_only_the_heartbeats_finite_top_level_numbers_are_kept():
    text = json.dumps({"step": 3, "loss": 0.25, "acc": 1, "ok": True, "name": "x", "nested": {"a": 1}, "t": 5})

    assert numeric_fields(text) == {"loss": 0.25, "acc": 1}
    assert numeric_fields('{"loss": NaN, "lr": Infinity}') == {}
    assert numeric_fields("not json") == {} and numeric_fields("[1, 2]") == {}
    assert len(numeric_fields(json.dumps({f"m{i}": i for i in range(100)}))) == MAX_FIELDS


def test_a_line_per_change_at_most_one_every_interval(tmp_path):
    log = MetricsLog(tmp_path / "logs" / "metrics.jsonl", every=10)

    assert log.record(Progress(step=1, changed_epoch=100.0), '{"step": 1, "loss": 2.0}', 100.0, 95.0)
    assert not log.record(Progress(step=1, changed_epoch=100.0), '{"step": 1}', 120.0, 95.0), "no change, no line"
    assert not log.record(Progress(step=2, changed_epoch=105.0), '{"step": 2}', 105.0, 95.0), "within the interval"
    assert log.record(Progress(step=3, steps_per_second=0.2, changed_epoch=115.0), '{"loss": 1.5}', 115.0, None)
    assert not log.record(Progress(), "", 500.0, None), "never reported: nothing to draw"

    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert lines == [
        {"t": "1970-01-01T00:01:40Z", "step": 1, "steps_per_second": None, "gpu_percent": 95.0, "loss": 2.0},
        {"t": "1970-01-01T00:01:55Z", "step": 3, "steps_per_second": 0.2, "gpu_percent": None, "loss": 1.5},
    ]


def test_a_history_that_cannot_be_written_costs_the_history_not_the_run(tmp_path):
    (tmp_path / "logs").write_text("a file where the folder should be")
    log = MetricsLog(tmp_path / "logs" / "metrics.jsonl")

    assert not log.record(Progress(step=1, changed_epoch=1.0), "{}", 1.0, None) and log.failed


HOSTILE = "\x1b]0;x\x07\x1b[2J"  # retitles the window, clears the screen


def test_a_metric_name_outside_the_safe_set_is_dropped_with_one_log_line(tmp_path):
    said: list[str] = []
    log = MetricsLog(tmp_path / "metrics.jsonl", every=0, log=said.append)
    beat = json.dumps({"loss": 0.5, HOSTILE: 1.0, "val/acc": 0.9, "lr-0.1": 2, "\u202eevil": 3, "x" * 65: 4})

    assert log.record(Progress(step=1, changed_epoch=1.0), beat, 1.0, None)
    assert log.record(Progress(step=2, changed_epoch=2.0), beat, 2.0, None)

    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [sorted(set(line) - {"t", "step", "steps_per_second", "gpu_percent"}) for line in lines] == [
        ["loss", "lr-0.1", "val/acc"]
    ] * 2
    assert "\x1b" not in log.path.read_text() and "\u202e" not in log.path.read_text()
    assert len(said) == 1, "one line per attempt, not one per beat"
    assert said[0].startswith("metrics history: dropped 3 heartbeat name(s) outside [A-Za-z0-9_./-]{1,64}: ")
    assert all(char.isprintable() for char in said[0]), said[0]
