"""Issue 12's cloud-side stall backstop: the agent's `Progress` metric heard, then silent for the run's
stall_seconds + the margin, ends the attempt as `stalled` (a box too hung to end its own stall).

The real supervisor against moto's CloudWatch and EC2, as tests/supervisor/test_supervisor.py does.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.supervisor.conftest import agent_metric, event, start
from training_infra.supervisor.runtime.supervisor import MAX_METRIC_POINTS, SCHEDULED, STATE_CHANGE, metric_period


def progress(account, run_id: str, minutes_ago: float) -> None:
    """What the agent puts in a minute the trainer made progress."""
    agent_metric(account, "Progress", ("RunId", run_id), minutes_ago)


def test_progress_silent_for_stall_minutes_plus_the_margin_ends_the_attempt_as_stalled(account):
    first = start(account, stall_seconds=600).attempts[0]
    account.clock.advance(minutes=30)
    progress(account, "bert", minutes_ago=16)  # 10 min stall + 5 min margin: 16 min of silence is past it
    account.supervisor().handle(event(SCHEDULED))

    attempt = account.run().attempts[0]
    assert attempt.unhealthy == "no training progress for 15+ min (stall_minutes + margin)"
    assert account.instances_of("bert")[0]["State"]["Name"] in ("shutting-down", "terminated")
    account.end_instance(first.instance_id)
    account.supervisor().handle(event(STATE_CHANGE, first.instance_id, state="terminated"))
    ended = account.run().attempts[0]
    assert ended.end_reason == "stalled", "an error: relaunched only while --max-restarts-on-errors allows"
    assert account.run().state == "stalled"


def test_progress_within_the_window_never_heard_or_stall_off_is_left_alone(account):
    start(account, stall_seconds=600)
    account.clock.advance(minutes=30)
    progress(account, "bert", minutes_ago=14)  # inside 10 + 5 min
    account.supervisor().handle(event(SCHEDULED))
    assert not account.run().attempts[0].unhealthy

    # A trainer that never reports progress is not judged by it.
    account.new_run("quiet", stall_seconds=600)
    account.supervisor().reconcile("quiet")
    account.clock.advance(minutes=60)
    account.supervisor().handle(event(SCHEDULED))
    assert not account.run("quiet").attempts[0].unhealthy

    # stall_minutes=0 turns the backstop off too.
    account.new_run("off", stall_seconds=0)
    account.supervisor().reconcile("off")
    account.clock.advance(minutes=5)
    progress(account, "off", minutes_ago=4)
    account.clock.advance(minutes=60)
    account.supervisor().handle(event(SCHEDULED))
    assert not account.run("off").attempts[0].unhealthy


@pytest.mark.parametrize("minutes", [1, 1440, 1441, 3 * (1440 + 5), 30 * 1440])
def test_the_silence_check_asks_cloudwatch_for_at_most_1440_points_at_the_finest_period(minutes):
    """CloudWatch refuses a GetMetricStatistics call past 1,440 points; a 24 h stall_minutes looks 3 days back."""
    period = metric_period(timedelta(minutes=minutes))
    assert period % 60 == 0 and minutes * 60 / period <= MAX_METRIC_POINTS
    assert period == 60 or minutes * 60 / (period - 60) > MAX_METRIC_POINTS, "no coarser than it must be"
