"""The heartbeat's `metrics` reach the attempt's progress record (progress.json and status.json), which is what a
sweep's supervisor reads for the objective and for pruning (docs/agent.md, "Progress")."""

from __future__ import annotations

import json

from training_infra.compute.agent.ti_agent.progress import MAX_METRICS, Beat, Progress, observe


def _look(progress: Progress, beat: dict | str, at: float) -> Progress:
    text = beat if isinstance(beat, str) else json.dumps(beat)
    return observe(progress, Beat(written_ns=int(at * 1e9), text=text), at, since=0)[0]


def test_a_beats_numeric_metrics_are_kept_in_the_progress_record_with_its_step():
    progress = _look(Progress(), {"step": 10, "metrics": {"val_loss": 0.31, "acc": 0.9}}, 100)
    progress = _look(progress, {"step": 20, "metrics": {"val_loss": 0.25}}, 160)

    record = progress.record()
    assert record["step"] == 20 and record["metrics"] == {"val_loss": 0.25}


def test_metrics_that_are_not_finite_numbers_are_dropped_and_a_beat_without_metrics_keeps_the_last_ones():
    progress = _look(Progress(), {"step": 1, "metrics": {"loss": "low", "flag": True, "nan": float("nan"),
                                                         "inf": float("inf"), "ok": 2}}, 10)  # fmt: skip
    assert progress.record()["metrics"] == {"ok": 2}
    progress = _look(progress, {"step": 2}, 20)
    assert progress.record()["metrics"] == {"ok": 2}


def test_a_beat_with_hundreds_of_metrics_keeps_a_bounded_number_and_a_record_without_metrics_has_no_key():
    many = {f"m{i:03d}": i for i in range(500)}
    progress = _look(Progress(), {"step": 1, "metrics": many}, 10)
    assert len(progress.record()["metrics"]) == MAX_METRICS
    assert "metrics" not in _look(Progress(), {"step": 1}, 10).record()
