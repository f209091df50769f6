"""Capacity Blocks: `capacity offers` lists EC2's offerings, `capacity buy` is refused without --yes or above the
month's limit and otherwise buys exactly the offering named.

moto has no Capacity Blocks: DescribeCapacityBlockOfferings and PurchaseCapacityBlock are answered by a botocore
Stubber in their documented shapes (EC2 API reference), which also checks every request against the API model; a
call the test did not queue (a purchase that must not happen) fails the Stubber.
"""

from __future__ import annotations

from datetime import UTC, datetime

import botocore.session
import pytest
from botocore.stub import Stubber

from training_infra.cli.capacity import Offering, buy_refusal, offerings, purchase
from training_infra.cli.errors import CliError

START = datetime(2026, 12, 10, 11, 30, tzinfo=UTC)
END = datetime(2026, 12, 11, 11, 30, tzinfo=UTC)


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
            purchase(ec2, "cb-0123456789abcdef0", "p5.48xlarge", 1, 24, yes=False, month=(0.0, None))
        stub.assert_no_pending_responses()  # and no PurchaseCapacityBlock: the Stubber would have refused it
    assert str(refused.value) == (
        "refused: Capacity Block cb-0123456789abcdef0 (1 x p5.48xlarge in us-east-1a from 2026-12-10T11:30:00Z to "
        "2026-12-11T11:30:00Z) costs 743.23 USD upfront: pass --yes to buy it (not refundable)"
    )
    assert "\n" not in str(refused.value)


def test_buy_above_what_the_month_has_left_is_refused_even_with_yes():
    ec2 = _ec2()
    with Stubber(ec2) as stub:
        _offer(stub, ("cb-0123456789abcdef0", "us-east-1a", "743.23"))
        with pytest.raises(CliError) as refused:
            purchase(ec2, "cb-0123456789abcdef0", "p5.48xlarge", 1, 24, yes=True, month=(1000.0, 600.0))
    assert str(refused.value).endswith("costs 743.23 USD upfront: monthly_limit_usd 1000 has $600.00 left this month")


def test_buy_with_yes_within_the_limit_buys_exactly_that_offering_for_linux():
    ec2 = _ec2()
    with Stubber(ec2) as stub:
        _offer(stub, ("cb-0123456789abcdef0", "us-east-1a", "743.23"))
        stub.add_response(
            "purchase_capacity_block",
            {"CapacityReservation": {"CapacityReservationId": "cr-0123456789abcdef0", "InstanceType": "p5.48xlarge",
                                     "AvailabilityZone": "us-east-1a", "ReservationType": "capacity-block"}},
            {"CapacityBlockOfferingId": "cb-0123456789abcdef0", "InstancePlatform": "Linux/UNIX"},
        )  # fmt: skip
        line = purchase(ec2, "cb-0123456789abcdef0", "p5.48xlarge", 1, 24, yes=True, month=(1000.0, 800.0))
        stub.assert_no_pending_responses()
    assert line == (
        "bought Capacity Block cr-0123456789abcdef0: 1 x p5.48xlarge in us-east-1a from 2026-12-10T11:30:00Z to "
        "2026-12-11T11:30:00Z, 743.23 USD"
    )


def test_an_offering_no_longer_offered_is_not_bought():
    ec2 = _ec2()
    with Stubber(ec2) as stub:
        _offer(stub, ("cb-0fedcba9876543210", "us-east-1b", "700"))
        with pytest.raises(CliError, match="not among EC2's offerings .* list them again"):
            purchase(ec2, "cb-0123456789abcdef0", "p5.48xlarge", 1, 24, yes=True, month=(0.0, None))


def test_a_fee_that_cannot_be_read_is_refused_when_there_is_a_monthly_limit():
    offer = Offering("cb-1", "p5.48xlarge", "us-east-1a", 1, START, END, 24, None, "USD")
    assert buy_refusal(offer, True, 1000.0, 900.0) == "monthly_limit_usd 1000 has $900.00 left this month"
    assert buy_refusal(offer, True, 0.0, None) == "", "no limit deployed: --yes is the whole decision"


@pytest.mark.parametrize(("args", "fragment"), [
    (["--hours", "0"], "option '--hours': got '0'; allowed: a whole number from 1 to 4368"),
    (["--hours", "24", "--count", "x"], "option '--count': got 'x'; allowed: a whole number from 1 to 64"),
])  # fmt: skip
def test_capacity_offers_bad_numbers_are_one_usage_line_before_any_aws_call(stacks, args, fragment):
    assert fragment in stacks.usage_error("capacity", "offers", "--type", "p5.48xlarge", *args)
