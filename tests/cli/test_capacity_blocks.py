"""Capacity Blocks: `capacity offers` lists EC2's offerings, `capacity buy` is refused without --yes or above the
month's limit and otherwise buys exactly the offering named, its fee charged in the month's ledger.

moto has no Capacity Blocks: DescribeCapacityBlockOfferings and PurchaseCapacityBlock are answered by a botocore
Stubber in their documented shapes (EC2 API reference), which also checks every request against the API model; a
call the test did not queue (a purchase that must not happen) fails the Stubber. The month's ledger is the real one
(records.MonthlyLedger, ledger.BlockFees) on moto's DynamoDB.
"""

from __future__ import annotations

from datetime import UTC, datetime

import boto3
import botocore.exceptions
import botocore.session
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from training_infra.cli.capacity import MonthFees, Offering, buy_refusal, offerings, purchase
from training_infra.cli.errors import CliError
from training_infra.supervisor.runtime.ledger import BlockFees
from training_infra.supervisor.runtime.records import MonthlyLedger

START = datetime(2026, 12, 10, 11, 30, tzinfo=UTC)
END = datetime(2026, 12, 11, 11, 30, tzinfo=UTC)
MONTH = MonthlyLedger.key(datetime(2026, 12, 5, tzinfo=UTC))


@pytest.fixture
def dynamodb():
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        client.create_table(
            TableName="runs", BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "run_id", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "run_id", "KeyType": "HASH"}],
        )  # fmt: skip
        yield client


def _fees(dynamodb, limit: float, spent_by_a_run: float = 0.0) -> MonthFees:
    """The month's ledger with `limit`, `spent_by_a_run` already reserved and settled by a run."""
    ledger = MonthlyLedger(dynamodb, "runs", limit)
    if spent_by_a_run:
        ledger.reserve(MONTH, "earlier-run", spent_by_a_run, "test")
        ledger.settle(MONTH, "earlier-run", spent_by_a_run)
    return MonthFees(BlockFees(ledger), MONTH)


def _sold(stub: Stubber, offering: str, reservation: str) -> None:
    stub.add_response(
        "purchase_capacity_block",
        {"CapacityReservation": {"CapacityReservationId": reservation, "InstanceType": "p5.48xlarge",
                                 "AvailabilityZone": "us-east-1a", "ReservationType": "capacity-block"}},
        {"CapacityBlockOfferingId": offering, "InstancePlatform": "Linux/UNIX", "TagSpecifications": [
            {"ResourceType": "capacity-reservation", "Tags": [{"Key": "training-infra:managed", "Value": "true"}]},
        ]},  # tagged: the supervisor may launch only into blocks with the tag
    )  # fmt: skip


def _ec2():
    return botocore.session.get_session().create_client(
        "ec2",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106
    )


def _offer(stub: Stubber, *offers: tuple[str, str, str], count: int = 1, hours: int = 24) -> None:
    """(offering id, zone, upfront fee) answers for p5.48xlarge x count for hours."""
    stub.add_response(
        "describe_capacity_block_offerings",
        {"CapacityBlockOfferings": [
            {"CapacityBlockOfferingId": oid, "InstanceType": "p5.48xlarge", "AvailabilityZone": zone,
             "InstanceCount": count, "StartDate": START, "EndDate": END, "CapacityBlockDurationHours": hours,
             "UpfrontFee": fee, "CurrencyCode": "USD", "Tenancy": "default"}
            for oid, zone, fee in offers
        ]},
        {"InstanceType": "p5.48xlarge", "InstanceCount": count, "CapacityDurationHours": hours},
    )  # fmt: skip


def test_offers_lists_start_end_zone_and_upfront_price_soonest_first():
    ec2 = _ec2()
    with Stubber(ec2) as stub:
        _offer(stub, ("cb-0123456789abcdef0", "us-east-1a", "743.23"), ("cb-0fedcba9876543210", "us-east-1b", "700"))
        found = offerings(ec2, "p5.48xlarge", 1, 24)
    assert [o.row() for o in found][0] == {
        "offering_id": "cb-0fedcba9876543210", "instance_type": "p5.48xlarge", "zone": "us-east-1b", "count": 1,
        "start": "2026-12-10T11:30:00Z", "end": "2026-12-11T11:30:00Z", "hours": 24, "upfront_fee": 700.0,
        "currency": "USD",
    }, "same start: the cheaper first"  # fmt: skip
    assert found[1].price() == "743.23 USD"


def test_an_offering_ec2_refuses_to_list_is_one_line_with_ec2s_words():
    ec2 = _ec2()
    with Stubber(ec2) as stub:
        stub.add_client_error("describe_capacity_block_offerings", "InvalidParameterValue",
                              "The duration must be a multiple of 24 hours.")  # fmt: skip
        with pytest.raises(CliError) as refused:
            offerings(ec2, "p5.48xlarge", 1, 25)
    assert str(refused.value) == (
        "EC2 refused to list Capacity Block offerings for 1 x p5.48xlarge for 25 h: InvalidParameterValue: "
        "The duration must be a multiple of 24 hours."
    )


def test_buy_without_yes_is_refused_in_one_line_and_buys_nothing():
    ec2 = _ec2()
    with Stubber(ec2) as stub:
        _offer(stub, ("cb-0123456789abcdef0", "us-east-1a", "743.23"))
        with pytest.raises(CliError) as refused:
            purchase(ec2, "cb-0123456789abcdef0", "p5.48xlarge", 1, 24, yes=False, fees=None)
        stub.assert_no_pending_responses()  # and no PurchaseCapacityBlock: the Stubber would have refused it
    assert str(refused.value) == (
        "refused: Capacity Block cb-0123456789abcdef0 (1 x p5.48xlarge in us-east-1a from 2026-12-10T11:30:00Z to "
        "2026-12-11T11:30:00Z) costs 743.23 USD upfront: pass --yes to buy it (not refundable)"
    )
    assert "\n" not in str(refused.value)


def test_buy_above_what_the_month_has_left_is_refused_even_with_yes(dynamodb):
    ec2 = _ec2()
    fees = _fees(dynamodb, 1000.0, spent_by_a_run=400.0)
    with Stubber(ec2) as stub:
        _offer(stub, ("cb-0123456789abcdef0", "us-east-1a", "743.23"))
        with pytest.raises(CliError) as refused:
            purchase(ec2, "cb-0123456789abcdef0", "p5.48xlarge", 1, 24, yes=True, fees=fees)
    assert str(refused.value).endswith(
        "costs 743.23 USD upfront: monthly_limit_usd 1000: spent $400.00 and reserved $0.00 by active runs this month, "
        "$600.00 left"
    )
    assert fees.fees.listed(MONTH) == [] and fees.fees.ledger.left(MONTH)[0] == 400.0, "nothing charged"


def test_buy_with_yes_within_the_limit_buys_exactly_that_offering_and_counts_its_fee_in_the_month(dynamodb):
    ec2 = _ec2()
    fees = _fees(dynamodb, 1000.0, spent_by_a_run=200.0)
    with Stubber(ec2) as stub:
        _offer(stub, ("cb-0123456789abcdef0", "us-east-1a", "743.23"))
        _sold(stub, "cb-0123456789abcdef0", "cr-0123456789abcdef0")
        line = purchase(ec2, "cb-0123456789abcdef0", "p5.48xlarge", 1, 24, yes=True, fees=fees)
        stub.assert_no_pending_responses()
    assert line == (
        "bought Capacity Block cr-0123456789abcdef0: 1 x p5.48xlarge in us-east-1a from 2026-12-10T11:30:00Z to "
        "2026-12-11T11:30:00Z, 743.23 USD (counted in 2026-12's spend)"
    )
    spent, reserved, left = fees.fees.ledger.left(MONTH)
    assert (spent, reserved, round(left, 2)) == (943.23, 0.0, 56.77), "the fee is spent this month"
    [block] = fees.fees.listed(MONTH)
    assert (block["offering_id"], block["fee_usd"], block["state"], block["reservation"]) == (
        "cb-0123456789abcdef0", 743.23, "bought", "cr-0123456789abcdef0",
    )  # fmt: skip


def test_two_buys_against_one_limit_the_second_is_refused_and_never_reaches_ec2(dynamodb):
    ec2 = _ec2()
    fees = _fees(dynamodb, 1000.0)
    with Stubber(ec2) as stub:
        _offer(stub, ("cb-0123456789abcdef0", "us-east-1a", "600"), ("cb-0fedcba9876543210", "us-east-1b", "600"))
        _sold(stub, "cb-0123456789abcdef0", "cr-0123456789abcdef0")
        purchase(ec2, "cb-0123456789abcdef0", "p5.48xlarge", 1, 24, yes=True, fees=fees)
        _offer(stub, ("cb-0123456789abcdef0", "us-east-1a", "600"), ("cb-0fedcba9876543210", "us-east-1b", "600"))
        with pytest.raises(CliError, match=r"spent \$600.00 .* \$400.00 left"):
            purchase(ec2, "cb-0fedcba9876543210", "p5.48xlarge", 1, 24, yes=True, fees=fees)
        stub.assert_no_pending_responses()  # no second PurchaseCapacityBlock was queued, none was made
    assert [b["offering_id"] for b in fees.fees.listed(MONTH)] == ["cb-0123456789abcdef0"]


class RacingDynamoDB:
    """The ledger's DynamoDB client, but another buyer's whole charge lands between this one's read and its put."""

    def __init__(self, client, other) -> None:
        self._client, self._other = client, other

    def __getattr__(self, name):
        return getattr(self._client, name)

    def put_item(self, **request):
        other, self._other = self._other, None
        if other is not None:
            other()  # read the same version as we did, and put first
        return self._client.put_item(**request)


def test_two_buyers_reading_the_same_remainder_only_one_is_charged(dynamodb):
    mine = BlockFees(MonthlyLedger(RacingDynamoDB(dynamodb, None), "runs", 1000.0))
    theirs = BlockFees(MonthlyLedger(dynamodb, "runs", 1000.0))
    mine.ledger._db._other = lambda: theirs.charge(MONTH, "cb-theirs", 600.0, "theirs", "2026-12-05T03:00:00Z")
    with pytest.raises(RuntimeError, match=r"\$400.00 left"):  # OverLimit, after re-reading the changed item
        mine.charge(MONTH, "cb-mine", 600.0, "mine", "2026-12-05T03:00:00Z")
    assert [b["offering_id"] for b in mine.listed(MONTH)] == ["cb-theirs"] and mine.ledger.left(MONTH)[0] == 600.0


def test_a_block_ec2_refuses_to_sell_takes_its_charge_back(dynamodb):
    ec2 = _ec2()
    fees = _fees(dynamodb, 1000.0)
    with Stubber(ec2) as stub:
        _offer(stub, ("cb-0123456789abcdef0", "us-east-1a", "743.23"))
        stub.add_client_error("purchase_capacity_block", "InsufficientCapacity", "The offering is no longer available.")
        with pytest.raises(CliError, match="EC2 refused to sell Capacity Block cb-0123456789abcdef0: InsufficientCap"):
            purchase(ec2, "cb-0123456789abcdef0", "p5.48xlarge", 1, 24, yes=True, fees=fees)
    assert fees.fees.listed(MONTH) == [] and fees.fees.ledger.left(MONTH) == (0.0, 0.0, 1000.0)


def test_a_ledger_the_buyer_may_not_write_buys_nothing(dynamodb):
    ec2 = _ec2()
    fees = _fees(dynamodb, 1000.0)
    denied = botocore.exceptions.ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "PutItem")

    def refuse(**_request):
        raise denied

    fees.fees.ledger._db = type("Denied", (), {"get_item": dynamodb.get_item, "put_item": staticmethod(refuse)})()
    with Stubber(ec2) as stub:
        _offer(stub, ("cb-0123456789abcdef0", "us-east-1a", "743.23"))
        with pytest.raises(CliError, match="could not be charged .AccessDeniedException.; nothing bought"):
            purchase(ec2, "cb-0123456789abcdef0", "p5.48xlarge", 1, 24, yes=True, fees=fees)
        stub.assert_no_pending_responses()


def test_an_offering_no_longer_offered_is_not_bought():
    ec2 = _ec2()
    with Stubber(ec2) as stub:
        _offer(stub, ("cb-0fedcba9876543210", "us-east-1b", "700"))
        with pytest.raises(CliError, match="not among EC2's offerings .* list them again"):
            purchase(ec2, "cb-0123456789abcdef0", "p5.48xlarge", 1, 24, yes=True, fees=None)


def test_a_fee_that_cannot_be_read_is_refused_when_there_is_a_monthly_limit():
    offer = Offering("cb-1", "p5.48xlarge", "us-east-1a", 1, START, END, 24, None, "USD")
    assert buy_refusal(offer, True, 1000.0) == "its fee cannot be read, so monthly_limit_usd 1000 cannot hold it"
    assert buy_refusal(offer, True, 0.0) == "", "no limit deployed: --yes is the whole decision"


@pytest.mark.parametrize(("args", "fragment"), [
    (["--hours", "0"], "option '--hours': got '0'; allowed: a whole number from 1 to 4368"),
    (["--hours", "24", "--count", "x"], "option '--count': got 'x'; allowed: a whole number from 1 to 64"),
])  # fmt: skip
def test_capacity_offers_bad_numbers_are_one_usage_line_before_any_aws_call(stacks, args, fragment):
    assert fragment in stacks.usage_error("capacity", "offers", "--type", "p5.48xlarge", *args)


# ---- a purchase interrupted between the ledger's charge and EC2's answer -----------------------------------------

OFFER = "cb-0123456789abcdef0"
BLOCK_OF_OFFER = {"instance_type": "p5.48xlarge", "zone": "us-east-1a", "count": 1, "start": "2026-12-10T11:30:00Z",
                  "end": "2026-12-11T11:30:00Z"}  # fmt: skip


def _interrupted(fees: MonthFees, minutes_ago: float) -> None:
    """What `capacity buy` left when it stopped after the charge (BotoCoreError, timeout, Ctrl-C)."""
    from datetime import timedelta

    from training_infra.supervisor.runtime.records import iso

    at = iso(datetime.now(UTC) - timedelta(minutes=minutes_ago))
    fees.fees.charge(MONTH, OFFER, 743.23, "1 x p5.48xlarge in us-east-1a", at, BLOCK_OF_OFFER)


def _listed_blocks(stub: Stubber, *blocks: dict) -> None:
    stub.add_response(
        "describe_capacity_reservations",
        {"CapacityReservations": list(blocks)},
        {"Filters": [{"Name": "tag:training-infra:managed", "Values": ["true"]},
                     {"Name": "instance-type", "Values": ["p5.48xlarge"]}]},
    )  # fmt: skip


def test_a_retry_after_a_purchase_ec2_completed_settles_it_bought_and_buys_nothing_again(dynamodb):
    ec2, fees = _ec2(), _fees(dynamodb, 1000.0)
    _interrupted(fees, minutes_ago=2)
    with Stubber(ec2) as stub:
        _listed_blocks(stub, {"CapacityReservationId": "cr-0aaaaaaaaaaaaaaa0", "ReservationType": "capacity-block",
                              "AvailabilityZone": "us-east-1b", "TotalInstanceCount": 1, "StartDate": START,
                              "EndDate": END},  # another zone: another offering's block
                       {"CapacityReservationId": "cr-0123456789abcdef0", "ReservationType": "capacity-block",
                        "AvailabilityZone": "us-east-1a", "TotalInstanceCount": 1, "StartDate": START,
                        "EndDate": END})  # fmt: skip
        line = purchase(ec2, OFFER, "p5.48xlarge", 1, 24, yes=True, fees=fees)  # no purchase queued: none made
        stub.assert_no_pending_responses()
    assert line.startswith(f"Capacity Block cr-0123456789abcdef0 was bought from offering {OFFER} by an interrupted")
    [block] = fees.fees.listed(MONTH)
    assert (block["state"], block["reservation"]) == ("bought", "cr-0123456789abcdef0")
    assert fees.fees.ledger.left(MONTH)[0] == 743.23, "charged once"


def test_a_retry_soon_after_a_purchase_with_no_block_yet_is_refused_in_one_line(dynamodb):
    ec2, fees = _ec2(), _fees(dynamodb, 1000.0)
    _interrupted(fees, minutes_ago=1)
    with Stubber(ec2) as stub, pytest.raises(CliError, match=r"EC2 lists no Capacity Block from it yet: .*wait"):
        _listed_blocks(stub)
        purchase(ec2, OFFER, "p5.48xlarge", 1, 24, yes=True, fees=fees)
    assert fees.fees.listed(MONTH)[0]["state"] == "buying", "left as it was"


def test_a_retry_ten_minutes_after_a_purchase_that_made_no_block_takes_the_charge_back_and_buys_it(dynamodb):
    ec2, fees = _ec2(), _fees(dynamodb, 1000.0)
    _interrupted(fees, minutes_ago=11)
    with Stubber(ec2) as stub:
        _listed_blocks(stub)
        _offer(stub, (OFFER, "us-east-1a", "743.23"))
        _sold(stub, OFFER, "cr-0123456789abcdef0")
        line = purchase(ec2, OFFER, "p5.48xlarge", 1, 24, yes=True, fees=fees)
        stub.assert_no_pending_responses()
    assert line.startswith(f"note: the purchase of offering {OFFER} begun ") and "its charge was taken back" in line
    assert "bought Capacity Block cr-0123456789abcdef0" in line
    [block] = fees.fees.listed(MONTH)
    assert block["state"] == "bought" and fees.fees.ledger.left(MONTH)[0] == 743.23, "charged once, not twice"
