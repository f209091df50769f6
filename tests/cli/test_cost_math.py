"""The arithmetic behind `status` and `cost`, on price histories moto cannot serve (it has one fixed spot price)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from training_infra.cli.render import fmt_duration, fmt_usd
from training_infra.cli.runs import Run, new_run_id, time_weighted_cost

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


def test_spot_cost_charges_each_price_for_the_time_it_was_in_effect():
    history = [(T0 - hours(1), 0.30), (T0 + hours(1), 0.50), (T0 + hours(3), 0.20)]

    assert time_weighted_cost(history, T0, T0 + hours(4)) == pytest.approx(0.30 * 1 + 0.50 * 2 + 0.20 * 1)


def test_spot_cost_ignores_changes_before_the_start_and_after_the_end():
    history = [(T0 - hours(5), 9.0), (T0 - hours(2), 0.40), (T0 + hours(10), 9.0)]

    assert time_weighted_cost(history, T0, T0 + hours(2)) == pytest.approx(0.80)


def test_spot_cost_uses_the_first_known_price_when_history_starts_after_the_run():
    assert time_weighted_cost([(T0 + hours(1), 0.25)], T0, T0 + hours(2)) == pytest.approx(0.50)


def test_spot_cost_is_unknown_without_history():
    assert time_weighted_cost([], T0, T0 + hours(1)) is None


def test_a_running_run_is_billed_until_now_and_a_finished_one_until_it_ended():
    running = Run(run_id="r", state="running", launched_at=T0)
    finished = Run(run_id="f", state="terminated", launched_at=T0, status={"ended_at": "2026-11-28T11:30:00Z"})

    assert running.interval(T0 + hours(2)) == (T0, T0 + hours(2))
    assert finished.interval(T0 + hours(9)) == (T0, T0 + hours(1.5))
    assert Run(run_id="x", state="terminated", launched_at=T0).interval(T0) is None, (
        "no end time: cost unknown, not guessed"
    )


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0h 00m"), (5400, "1h 30m"), (26 * 3600 + 60, "1d 2h 01m"), (None, "-")]
)
def test_durations_read_as_hours_and_minutes(seconds, text):
    assert fmt_duration(seconds) == text


@pytest.mark.parametrize(
    ("usd", "text"), [(None, "-"), (0, "$0.00"), (0.00002, "<$0.01"), (1.509, "$1.51"), (1234.5, "$1,234.50")]
)
def test_money_reads_as_dollars_and_cents(usd, text):
    assert fmt_usd(usd) == text


def test_generated_run_ids_sort_by_start_time_and_differ():
    ids = {new_run_id(T0) for _ in range(50)}
    assert all(i.startswith("20261128-100000-") for i in ids)
    assert len(ids) > 1
    assert new_run_id(T0) < new_run_id(T0 + timedelta(seconds=1))
