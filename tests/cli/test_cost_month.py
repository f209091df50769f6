"""`cost --month` (issue 27): the month's standing under monthly_limit_usd, read from the supervisor's ledger."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from training_infra import naming
from training_infra.supervisor.runtime.records import MonthlyLedger

REGION = "ap-southeast-1"  # this module's own: the month's ledger holds exactly what is put here


@pytest.fixture(scope="module")
def month(deployed):
    deployment = deployed(REGION, monthly_limit_usd="50")
    ledger = MonthlyLedger(deployment.client("dynamodb"), deployment.outputs[naming.OUTPUT_RUN_TABLE], 50)
    key = MonthlyLedger.key(datetime.now(UTC))
    ledger.reserve(key, "month-finished", 20, "test")
    ledger.settle(key, "month-finished", 12.5)  # ended having spent $12.50 of its $20 reservation
    ledger.reserve(key, "month-active", 15, "test")  # still going: may cost up to $15
    return deployment


def test_cost_month_shows_spent_reserved_and_left_under_the_monthly_limit(month):
    result = month.cli("cost", "--month", env={"COLUMNS": "80"})

    assert result.exit_code == 0, result.output
    header, row, note = result.stdout.splitlines()
    assert header.split() == ["MONTH", "LIMIT", "SPENT", "RESERVED", "LEFT"]
    assert row.split() == [f"{datetime.now(UTC):%Y-%m}", "$50.00", "$12.50", "$15.00", "$22.50"]
    assert note.startswith("spent: finished runs; reserved:")


def test_cost_month_as_json_for_scripts(month):
    standing = json.loads(month.cli("cost", "--month", "-o", "json").stdout)

    assert standing == {
        "month": f"{datetime.now(UTC):%Y-%m}",
        "limit_usd": 50.0,
        "spent_usd": 12.5,
        "reserved_usd": 15.0,
        "left_usd": 22.5,
    }


def test_cost_month_without_a_monthly_limit_says_so_in_one_line(stacks):
    result = stacks.cli("cost", "--month")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("monthly_limit_usd is 0 in us-east-1 (no monthly limit)")
    assert result.stdout.count("\n") == 1


def test_cost_month_with_a_period_is_a_usage_error(stacks):
    assert "option '--month': got it with --since, --days or --run" in stacks.usage_error("cost", "--month", "-d", "3")
