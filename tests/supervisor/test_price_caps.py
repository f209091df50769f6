"""A run's price cap in the supervisor's launch: pools over the cap are not offered, the fleet's own caps
are set, and when nothing fits the first launch is refused while a relaunch waits (prices move).

moto serves spot price history, but one fixed price ($0.00001) for every pool: the real moto answer
is used where that is enough; prices that differ by pool come from a botocore Stubber fed the
DescribeSpotPriceHistory shape, and list prices from one fed the GetProducts shape.
"""

from __future__ import annotations

from datetime import UTC, datetime

import boto3
import pytest
from botocore.stub import ANY, Stubber

from tests.supervisor.conftest import event
from tests.supervisor.test_supervisor import FleetWithErrors
from tests.test_pricing import price_list_product
from training_infra.supervisor.runtime.prices import MemoryCache, Prices
from training_infra.supervisor.runtime.supervisor import SPOT_WARNING, STATE_CHANGE

NOW = datetime(2026, 11, 29, 7, 0, tzinfo=UTC)


def spot_prices(prices: dict[tuple[str, str], str], listed: dict[str, str] | None = None) -> Prices:
    """Prices whose spot history is exactly `prices` ((type, zone) -> USD), as DescribeSpotPriceHistory answers;
    `listed`: list prices (type -> USD) as GetProducts answers."""
    ec2 = boto3.client("ec2", region_name="us-east-1")
    stub = Stubber(ec2)
    stub.add_response(
        "describe_spot_price_history",
        {
            "SpotPriceHistory": [
                {
                    "AvailabilityZone": z,
                    "InstanceType": t,
                    "ProductDescription": "Linux/UNIX",
                    "SpotPrice": usd,
                    "Timestamp": NOW,
                }
                for (t, z), usd in prices.items()
            ]  # fmt: skip
        },
        {"InstanceTypes": ANY, "ProductDescriptions": ANY, "StartTime": ANY},
    )
    stub.activate()
    return Prices(ec2=ec2, region="us-east-1", pricing=_price_list(listed) if listed else None, cache=MemoryCache())


def list_prices(prices: dict[str, str]) -> Prices:
    return Prices(ec2=None, region="us-east-1", pricing=_price_list(prices), cache=MemoryCache())


def _price_list(prices: dict[str, str]):
    pricing = boto3.client("pricing", region_name="us-east-1")
    stub = Stubber(pricing)
    for instance_type, usd in prices.items():
        stub.add_response("get_products", {"PriceList": [price_list_product(instance_type, usd, region="us-east-1")]})
    stub.activate()
    return pricing


def launch_with(account, prices: Prices, **spec):
    fleet = FleetWithErrors(account.ec2, failing_markets=set())
    account.new_run(**spec)
    supervisor = account.supervisor(ec2=fleet)
    supervisor.prices = prices
    supervisor.reconcile("bert")
    return fleet, account.run()


def _pools(request) -> set[tuple[str, str, str | None]]:
    return {
        (o["InstanceType"], o["SubnetId"], o.get("MaxPrice")) for o in request["LaunchTemplateConfigs"][0]["Overrides"]
    }


def test_only_spot_pools_at_or_under_the_cap_are_offered_each_with_the_cap_as_its_max_price(account):
    a, b = account.subnets["us-east-1a"], account.subnets["us-east-1b"]
    prices = spot_prices({
        ("g5.xlarge", "us-east-1a"): "0.45", ("g5.xlarge", "us-east-1b"): "0.70",
        ("g6.xlarge", "us-east-1a"): "0.80", ("g6.xlarge", "us-east-1b"): "0.50",
    })  # fmt: skip

    fleet, run = launch_with(account, prices, max_price_usd=0.5)

    (request,) = fleet.requests
    assert _pools(request) == {("g5.xlarge", a, "0.5"), ("g6.xlarge", b, "0.5")}
    assert request["SpotOptions"] == {"AllocationStrategy": "price-capacity-optimized", "MaxTotalPrice": "0.5"}
    assert run.attempts[0].instance_id


def test_on_demand_pools_are_filtered_by_list_price_and_the_fleet_gets_its_total_price_cap(account):
    prices = list_prices({"g5.xlarge": "1.0060000000", "g6.xlarge": "0.8050000000"})

    fleet, run = launch_with(account, prices, market="on-demand", max_price_usd=0.9)

    (request,) = fleet.requests
    assert {t for t, _, _ in _pools(request)} == {"g6.xlarge"}
    assert all(max_price is None for _, _, max_price in _pools(request)), "MaxPrice is a spot setting"
    assert request["OnDemandOptions"] == {"AllocationStrategy": "lowest-price", "MaxTotalPrice": "0.9"}
    assert run.attempts[0].instance_type == "g6.xlarge"


def test_the_local_aws_spot_history_is_read_for_real_and_every_pool_under_the_cap_is_offered(account):
    """moto answers DescribeSpotPriceHistory ($0.00001 everywhere): the supervisor's own Prices, no stub."""
    fleet = FleetWithErrors(account.ec2, failing_markets=set())
    account.new_run(max_price_usd=0.6)
    account.supervisor(ec2=fleet).reconcile("bert")

    (request,) = fleet.requests
    assert len(_pools(request)) == 4 and {p for _, _, p in _pools(request)} == {"0.6"}
    assert request["SpotOptions"]["MaxTotalPrice"] == "0.6"


def test_a_first_launch_with_every_pool_over_the_cap_is_refused_naming_the_cheapest_price_and_the_cap(account):
    prices = spot_prices({("g5.xlarge", "us-east-1a"): "0.45", ("g6.xlarge", "us-east-1b"): "0.30"})

    fleet, run = launch_with(account, prices, max_price_usd=0.2)

    assert fleet.requests == [], "no fleet asked for"
    assert run.state == "failed"
    assert run.message == (
        "no pool at or under the price cap of $0.20/hour: the cheapest seen is $0.30/hour "
        "(g6.xlarge, spot, us-east-1b): raise --max-price or add cheaper --instance-types"
    )
    assert account.instances_of("bert") == []


def test_spot_over_the_cap_falls_back_to_on_demand_under_it_with_spot_then_on_demand(account):
    prices = spot_prices(
        {("g5.xlarge", "us-east-1a"): "0.95", ("g6.xlarge", "us-east-1a"): "0.99"},
        listed={"g5.xlarge": "1.0060000000", "g6.xlarge": "0.8050000000"},
    )

    fleet, run = launch_with(account, prices, market="spot-then-on-demand", max_price_usd=0.9)

    assert [r["TargetCapacitySpecification"]["DefaultTargetCapacityType"] for r in fleet.requests] == ["on-demand"]
    assert run.attempts[0].market == "on-demand" and run.attempts[0].instance_type == "g6.xlarge"


def test_a_relaunch_with_every_pool_over_the_cap_waits_and_goes_ahead_when_prices_fall(account):
    first = launch_with(account, spot_prices({("g5.xlarge", "us-east-1a"): "0.30"}), max_price_usd=0.5)[1]
    supervisor = account.supervisor()
    supervisor.prices = spot_prices({("g5.xlarge", "us-east-1a"): "0.90", ("g6.xlarge", "us-east-1b"): "0.70"})
    account.clock.advance(minutes=20)
    reclaim_with(account, supervisor, first.attempts[0].instance_id)

    run = account.run()
    assert run.state == "recovering" and len(account.instances_of("bert")) == 1
    assert run.attempts[-1].end_reason == "capacity"
    assert run.message == (
        "no pool at or under the price cap of $0.50/hour: the cheapest seen is $0.70/hour "
        "(g6.xlarge, spot, us-east-1b) (prices move)"
    )
    assert any("waiting for capacity: no pool at or under the price cap of $0.50/hour" in n for n in account.notices())

    account.clock.advance(minutes=1)
    later = account.supervisor()
    later.prices = spot_prices({("g6.xlarge", "us-east-1b"): "0.40"})
    later.reconcile("bert")
    run = account.run()
    assert run.attempts[-1].instance_type == "g6.xlarge" and run.attempts[-1].zone == "us-east-1b"
    assert len(account.instances_of("bert")) == 2


def reclaim_with(account, supervisor, instance_id):
    """As test_supervisor's `reclaim`, with this supervisor (and its prices)."""
    supervisor.handle(event(SPOT_WARNING, instance_id, **{"instance-action": "terminate"}))
    account.end_instance(instance_id)
    supervisor.handle(event(STATE_CHANGE, instance_id, state="terminated"))


def test_prices_that_cannot_be_read_leave_every_pool_to_the_fleets_own_cap(account):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    stub = Stubber(ec2)
    stub.add_client_error("describe_spot_price_history", "UnauthorizedOperation", "not allowed")
    stub.activate()

    fleet, run = launch_with(account, Prices(ec2=ec2, region="us-east-1", cache=MemoryCache()), max_price_usd=0.5)

    (request,) = fleet.requests
    assert len(_pools(request)) == 4 and request["SpotOptions"]["MaxTotalPrice"] == "0.5"
    assert run.attempts[0].instance_id


@pytest.mark.parametrize("market", ["spot", "on-demand"])
def test_a_run_without_a_cap_asks_no_price_and_sets_no_fleet_cap(account, market):
    fleet, _run = launch_with(account, Prices(ec2=None, region="us-east-1", cache=MemoryCache()), market=market)

    (request,) = fleet.requests
    options = request["SpotOptions" if market == "spot" else "OnDemandOptions"]
    assert "MaxTotalPrice" not in options and all(p is None for _, _, p in _pools(request))
