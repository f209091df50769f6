"""`cost --month` (issue 27): the month's standing under monthly_limit_usd, read from the supervisor's ledger."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from training_infra import naming
from training_infra.supervisor.runtime.ledger import BlockFees
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
    blocks = BlockFees(ledger)  # `capacity buy` bought a $10 block (its runs are priced at their volume only)
    blocks.charge(key, "cb-0123456789abcdef0", 10, "1 x g5.xlarge in ap-southeast-1a", "2026-12-05T03:00:00Z")
    blocks.bought(key, "cb-0123456789abcdef0", "cr-0123456789abcdef0")
    return deployment


def test_cost_month_shows_spent_reserved_and_left_under_the_monthly_limit_with_block_fees_spent(month):
    result = month.cli("cost", "--month", env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    header, row, block, note = result.stdout.splitlines()
    assert header.split() == ["MONTH", "LIMIT", "SPENT", "RESERVED", "LEFT"]
    assert row.split() == [f"{datetime.now(UTC):%Y-%m}", "$50.00", "$22.50", "$15.00", "$12.50"], "$12.50 + $10 block"
    assert block == (
        "capacity block cr-0123456789abcdef0: $10.00 upfront, bought 2026-12-05T03:00:00Z (1 x g5.xlarge in "
        "ap-southeast-1a); in spent"
    )
    assert note.startswith("spent: finished runs and Capacity Block fees; reserved:")


def test_cost_month_as_json_for_scripts(month):
    standing = json.loads(month.cli("cost", "--month", "-o", "json").stdout)

    assert standing == {
        "month": f"{datetime.now(UTC):%Y-%m}",
        "limit_usd": 50.0,
        "spent_usd": 22.5,
        "reserved_usd": 15.0,
        "left_usd": 12.5,
        "capacity_blocks": [{
            "offering_id": "cb-0123456789abcdef0", "fee_usd": 10, "state": "bought", "at": "2026-12-05T03:00:00Z",
            "what": "1 x g5.xlarge in ap-southeast-1a", "reservation": "cr-0123456789abcdef0",
        }],
    }  # fmt: skip


def test_cost_month_without_a_monthly_limit_says_so_in_one_line(stacks):
    result = stacks.cli("cost", "--month")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("monthly_limit_usd is 0 in us-east-1 (no monthly limit)")
    assert result.stdout.count("\n") == 1


def test_cost_month_with_a_period_is_a_usage_error(stacks):
    assert "option '--month': got it with --since, --days or --run" in stacks.usage_error("cost", "--month", "-d", "3")
