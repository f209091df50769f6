"""The money rules the supervisor and the CLI share (issue 27: written once, in the ledger)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from training_infra.supervisor.runtime import ledger
from training_infra.supervisor.runtime.records import RunSpec

SPEC = RunSpec(instance_types=("g5.xlarge",), list_prices={"g5.xlarge": 1.006}, max_cost_usd=40.0)
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def test_a_resumed_runs_limit_counts_from_its_resume():
    resumed = replace(SPEC, spent_before_usd=15.0)

    assert ledger.spent_under_limit(resumed, 27.5) == pytest.approx(12.5)
    assert ledger.left_under_limit(resumed, 27.5) == pytest.approx(27.5)
    assert ledger.left_under_limit(SPEC, 27.5) == pytest.approx(12.5)
    assert ledger.left_under_limit(SPEC, 55.0) == 0.0, "never below zero"


def test_an_attempt_straddling_the_periods_start_counts_pro_rata():
    began, start, now = T0, T0 + timedelta(hours=1), T0 + timedelta(hours=10)

    assert ledger.share_inside(began, 4 * 3600, start, now) == pytest.approx((3 * 3600, 0.75))
    assert ledger.share_inside(began, 3600, start, now) is None, "ended when the period began"
    assert ledger.share_inside(start, 3600, start, now) == pytest.approx((3600, 1.0)), "wholly inside"
    assert ledger.share_inside(began, 0, start, now) == (0.0, 1.0), "no time: its whole (zero) cost"
    assert ledger.share_inside(began, 20 * 3600, start, now) == pytest.approx((9 * 3600, 0.45)), "still going"
