"""`launch --max-cost-usd` and the monthly limit: bad input and refusals leave nothing behind,
and two launches racing for the month's last dollars cannot both get them."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import pytest

from training_infra import naming
from training_infra.supervisor.runtime import ledger
from training_infra.supervisor.runtime.records import MonthlyLedger, OverLimit, RunStore, StaleRecord

LIMIT_REGION = "us-east-2"  # this module's own region (EC2 offers g5.xlarge in its zones a and b), monthly_limit_usd=30
# g5.xlarge at its list price plus the stack template's 150 GB gp3 volume.
HOURLY = 1.006 + ledger.volume_usd_per_hour(150)


@pytest.fixture(scope="module")
def limited(deployed):
    return deployed(LIMIT_REGION, monthly_limit_usd="30")


def _table(deployment) -> str:
    return deployment.outputs[naming.OUTPUT_RUN_TABLE]


def _month_ledger(deployment) -> MonthlyLedger:
    return MonthlyLedger(deployment.client("dynamodb"), _table(deployment), 30)


def _nothing_created(deployment, run_id: str) -> None:
    assert RunStore(deployment.client("dynamodb"), _table(deployment)).get(run_id) is None
    templates = deployment.client("ec2").describe_launch_templates(
        Filters=[{"Name": "launch-template-name", "Values": [f"{naming.PROJECT}-run-{run_id}"]}]
    )["LaunchTemplates"]
    assert templates == [] and deployment.run_instances(run_id) == []


@pytest.mark.parametrize("value", ["-5", "0", "0.0000001", "abc", "nan", "inf", ""])
def test_max_cost_usd_must_be_a_cent_or_more_and_is_refused_before_any_aws_call(stacks, value):
    """Issue 27: 0.0000001 was echoed as `1e-07`."""
    message = stacks.usage_error("launch", "--max-cost-usd", value)

    assert message == (
        f"error: option '--max-cost-usd': got {value!r}; allowed: US dollars from 0.01 up to 1000000, e.g. 25\n"
    )


def test_a_run_limit_below_one_graceful_stop_is_refused_and_creates_nothing(stacks):
    result = stacks.cli("launch", "--run-id", "limit-tiny", "--instance-type", "g5.xlarge", "--max-cost-usd", "0.1")

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "error: option '--max-cost-usd': got 0.1; allowed: more than one graceful stop's cost, "
        f"${HOURLY / 6:.2f} (g5.xlarge at ${HOURLY:.3f}/hour for 10 min)\n"
    )
    _nothing_created(stacks, "limit-tiny")


def test_a_run_limit_is_recorded_and_status_shows_spent_and_left(stacks):
    result = stacks.cli("launch", "--run-id", "limit-forty", "--max-cost-usd", "40")
    assert result.exit_code == 0, result.output

    record = RunStore(stacks.client("dynamodb"), _table(stacks)).get("limit-forty")
    assert record.spec.max_cost_usd == 40
    assert not record.spec.budget_month, "no monthly limit deployed here: nothing reserved"
    [row] = json.loads(stacks.cli("status", "limit-forty", "--json").stdout)
    assert row["max_cost_usd"] == 40 and row["left_usd"] == pytest.approx(40 - (row["cost_usd"] or 0))
    assert " of $40.00 ($" in stacks.cli("status", "limit-forty").stdout


def test_a_launch_the_month_cannot_hold_is_refused_with_what_was_spent_and_what_is_left(limited):
    month = _month_ledger(limited)
    key = MonthlyLedger.key(datetime.now(UTC))
    month.reserve(key, "earlier-run", 27.0, "test")
    month.settle(key, "earlier-run", 27.0)  # a finished run spent $27 of the $30

    result = limited.cli("launch", "--run-id", "month-full", "--instance-type", "g5.xlarge", "--max-runtime-hours", "4")

    assert result.exit_code == 1, result.output
    assert result.stderr == (
        "error: launch refused: monthly_limit_usd 30: spent $27.00 and reserved $0.00 by active runs this month, "
        f"$3.00 left; this run may cost up to ${4 * HOURLY:.2f} (g5.xlarge at ${HOURLY:.3f}/hour for 4 h); "
        "set a lower --max-cost-usd or --max-runtime-hours, or raise monthly_limit_usd\n"
    )
    _nothing_created(limited, "month-full")

    fits = limited.cli("launch", "--run-id", "month-fits", "--instance-type", "g5.xlarge", "--max-cost-usd", "2.5")

    assert fits.exit_code == 0, fits.output
    assert month.left(key) == (27.0, 2.5, pytest.approx(0.5))
    record = RunStore(limited.client("dynamodb"), _table(limited)).get("month-fits")
    assert (record.spec.budget_month, record.spec.reserved_usd) == (key, 2.5)


def test_two_launches_racing_for_the_last_dollars_of_the_month_cannot_both_get_them(limited):
    """Both read the same remainder before either writes; the version condition lets one through."""
    key = "#month-2031-01"
    _month_ledger(limited).reserve(key, "big-run", 26.0, "test")  # $4 left
    both_read = threading.Barrier(2)

    class Racing(MonthlyLedger):
        def read(self, month):
            values = super().read(month)
            if values["version"] == 1:  # the first read of each racer: wait until the other has read too
                both_read.wait(timeout=10)
            return values

    outcomes: dict[str, str] = {}

    def launch(run_id: str) -> None:
        racer = Racing(limited.client("dynamodb"), _table(limited), 30)
        try:
            racer.reserve(key, run_id, 3.0, "test")
            outcomes[run_id] = "reserved"
        except OverLimit as refused:
            outcomes[run_id] = str(refused)

    threads = [threading.Thread(target=launch, args=(name,)) for name in ("racer-a", "racer-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(outcomes.values())[-1] == "reserved" and list(outcomes.values()).count("reserved") == 1, outcomes
    refused = next(text for text in outcomes.values() if text != "reserved")
    assert "$1.00 left; this run may cost up to $3.00" in refused
    assert _month_ledger(limited).left(key) == (0.0, 29.0, pytest.approx(1.0))


def test_a_second_launch_of_the_same_id_neither_takes_nor_frees_the_first_ones_reservation(limited):
    key = "#month-2031-02"
    month = _month_ledger(limited)
    month.reserve(key, "same-id", 5.0, "the first launch")

    with pytest.raises(StaleRecord, match="run same-id is being launched by someone else"):
        month.reserve(key, "same-id", 5.0, "the second launch")

    assert month.left(key) == (0.0, 5.0, 25.0)


def test_a_limit_on_a_type_without_any_known_price_is_refused_because_its_spend_could_not_be_tracked(stacks):
    result = stacks.cli("launch", "--run-id", "limit-unpriced", "--instance-type", "c6i.xlarge", "--max-cost-usd", "5")

    assert result.exit_code == 1, result.output
    assert result.stderr == (
        "error: option '--max-cost-usd': no price is known for c6i.xlarge (AWS Price List or the built-in table), "
        "so its spend cannot be tracked; allowed: types with a known price, or --max-price to bound them\n"
    )
    _nothing_created(stacks, "limit-unpriced")
