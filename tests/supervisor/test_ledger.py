"""The ledger's arithmetic on hand-made price histories: what an attempt and a run cost."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from training_infra.supervisor.runtime import ledger
from training_infra.supervisor.runtime.records import Attempt, AttemptEnd, Run, RunSpec, RunState, iso

T0 = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
SPEC = RunSpec(instance_types=("g5.xlarge",), list_prices={"g5.xlarge": 1.006})


class History:
    """A SpotHistory stand-in answering from a fixed list, counting the questions."""

    def __init__(self, points):
        self.points, self.asked = points, []

    def prices(self, instance_type, zone):
        self.asked.append((instance_type, zone))
        return self.points


def attempt(hours: float | None, *, market="spot", start=T0, **extra) -> Attempt:
    ended = iso(start + timedelta(hours=hours)) if hours is not None else ""
    return Attempt(n=1, instance_id="i-0000000000000001", instance_type="g5.xlarge", zone="us-east-1a", market=market,
                   started_at=iso(start), ended_at=ended, **extra)  # fmt: skip


def test_a_spot_price_change_mid_attempt_charges_each_price_for_its_own_hours():
    history = History([(T0 - timedelta(hours=5), 0.30), (T0 + timedelta(hours=1), 0.50)])

    cost = ledger.price_attempt(attempt(3), SPEC, T0 + timedelta(hours=9), history)

    assert cost.usd == pytest.approx(0.30 * 1 + 0.50 * 2)
    assert (cost.hourly_usd, cost.source) == (0.50, "spot history")
    assert cost.on_demand_usd == pytest.approx(3 * 1.006)


def test_an_attempt_still_running_is_charged_until_now():
    history = History([(T0 - timedelta(hours=1), 0.40)])

    cost = ledger.price_attempt(attempt(None), SPEC, T0 + timedelta(minutes=90), history)

    assert cost.hours == pytest.approx(1.5) and cost.usd == pytest.approx(0.60)


def test_on_demand_attempts_use_the_list_price_the_run_recorded():
    cost = ledger.price_attempt(attempt(2, market="on-demand"), SPEC, T0 + timedelta(hours=3), History([]))

    assert (cost.usd, cost.source) == (pytest.approx(2.012), "on-demand list")


def test_a_spot_attempt_without_history_falls_back_to_the_agents_price_then_the_list_price():
    with_agent = ledger.price_attempt(attempt(2, price_usd=0.9), SPEC, T0 + timedelta(hours=3), History([]))
    without = ledger.price_attempt(attempt(2), SPEC, T0 + timedelta(hours=3), History([]))

    assert (with_agent.usd, with_agent.source) == (pytest.approx(1.8), "agent estimate")
    assert (without.usd, without.source) == (pytest.approx(2.012), "on-demand list")


def test_the_volume_bills_for_every_hour_of_the_attempt():
    spec = replace(SPEC, volume_gb=730)  # 730 GB at 0.08 USD/GB-month: 0.08 USD an hour

    cost = ledger.price_attempt(attempt(2, market="on-demand"), spec, T0 + timedelta(hours=3), History([]))

    assert cost.usd == pytest.approx(2 * (1.006 + 0.08))


def test_an_attempt_that_never_got_an_instance_costs_nothing():
    waiting = Attempt(n=1, claimed_at=iso(T0), end_reason=AttemptEnd.CAPACITY, ended_at=iso(T0 + timedelta(hours=1)))

    assert ledger.price_attempt(waiting, SPEC, T0 + timedelta(hours=2), History([])).usd is None


def test_a_recorded_price_is_read_back_not_asked_again():
    ended = attempt(2)
    ledger.record_price(ended, ledger.price_attempt(ended, SPEC, T0 + timedelta(hours=3), History([(T0, 0.25)])))
    history = History([(T0, 9.99)])

    cost = ledger.recorded_or_priced(ended, SPEC, T0 + timedelta(days=30), history)

    assert cost.usd == pytest.approx(0.50) and history.asked == []


def test_a_runs_summary_adds_up_its_priced_attempts_and_is_complete_only_once_it_ended():
    first, second = attempt(1, market="on-demand"), attempt(2, market="on-demand", start=T0 + timedelta(hours=2))
    for a in (first, second):
        ledger.record_price(a, ledger.price_attempt(a, SPEC, T0 + timedelta(hours=9), History([])))
    run = Run(
        run_id="r", spec=SPEC, deadline_at="", created_at=iso(T0), state=RunState.RUNNING, attempts=[first, second]
    )

    assert run.summary()["complete"] is False, "still going: cost reads the whole record"
    run.state = RunState.SUCCEEDED
    summary = run.summary()
    assert summary["complete"] is True and summary["tries"] == 2 and summary["seconds"] == 3 * 3600
    assert summary["cost_usd"] == pytest.approx(3 * 1.006) and summary["price_source"] == "on-demand list"
