"""Prices from AWS: the Price List API's answer as AWS documents it, spot price history, the caches,
and the built-in table only as the fallback (and saying so).

The local AWS has no Price List API, so its answers come from a botocore Stubber fed the GetProducts
response shape (PriceList: a list of JSON documents, one per product); the request the Stubber
expects is the exact filter set, so a wrong filter fails the test.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import botocore.session
import pytest
from botocore.stub import ANY, Stubber

from training_infra import pricing
from training_infra.supervisor.runtime import prices as prices_module
from training_infra.supervisor.runtime.prices import (
    BUILT_IN,
    NO_SPOT_PRICE,
    PRICE_LIST,
    SPOT_HISTORY,
    MemoryCache,
    Prices,
    Quote,
    cap_message,
    dollars,
    under_cap,
)

REGION = "eu-west-1"
RUNTIME_DIR = Path(prices_module.__file__).parent  # the supervisor Lambda's whole package (construct.RUNTIME_DIR)


def client(service: str, *, region: str = "us-east-1", endpoint: str | None = None):
    session = botocore.session.get_session()
    return session.create_client(
        service,
        region_name=region,
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 - a Stubber answers, nothing is signed for real
    )


def price_list_product(instance_type: str, usd: str, *, region: str = REGION) -> str:
    """One PriceList entry as GetProducts returns it: a JSON document (product, OnDemand and Reserved terms)."""
    sku = "JRTCKXETXFABCDEF"
    return json.dumps(
        {
            "product": {
                "productFamily": "Compute Instance",
                "attributes": {
                    "instanceType": instance_type,
                    "regionCode": region,
                    "operatingSystem": "Linux",
                    "tenancy": "Shared",
                    "preInstalledSw": "NA",
                    "capacitystatus": "Used",
                    "vcpu": "4",
                },
                "sku": sku,
            },
            "serviceCode": "AmazonEC2",
            "terms": {
                "Reserved": {
                    f"{sku}.4NA7Y494T4": {
                        "priceDimensions": {
                            f"{sku}.4NA7Y494T4.6YS6EN2CT7": {
                                "unit": "Hrs",
                                "pricePerUnit": {"USD": "0.4000000000"},
                                "description": "Linux/UNIX (Amazon VPC), g5.xlarge reserved instance applied",
                            }
                        },
                        "offerTermCode": "4NA7Y494T4",
                    }
                },
                "OnDemand": {
                    f"{sku}.JRTCKXETXF": {
                        "priceDimensions": {
                            f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
                                "unit": "Hrs",
                                "endRange": "Inf",
                                "beginRange": "0",
                                "pricePerUnit": {"USD": usd},
                                "appliesTo": [],
                                "rateCode": f"{sku}.JRTCKXETXF.6YS6EN2CT7",
                                "description": f"${usd} per On Demand Linux {instance_type} Instance Hour",
                            }
                        },
                        "sku": sku,
                        "effectiveDate": "2026-11-01T00:00:00Z",
                        "offerTermCode": "JRTCKXETXF",
                        "termAttributes": {},
                    }
                },
            },
            "version": "20261101000000",
            "publicationDate": "2026-11-01T00:00:00Z",
        }
    )


def expected_get_products(instance_type: str, region: str = REGION) -> dict:
    return {
        "ServiceCode": "AmazonEC2",
        "FormatVersion": "aws_v1",
        "MaxResults": 10,
        "Filters": [
            {"Type": "TERM_MATCH", "Field": "instanceType", "Value": instance_type},
            {"Type": "TERM_MATCH", "Field": "regionCode", "Value": region},
            {"Type": "TERM_MATCH", "Field": "operatingSystem", "Value": "Linux"},
            {"Type": "TERM_MATCH", "Field": "tenancy", "Value": "Shared"},
            {"Type": "TERM_MATCH", "Field": "preInstalledSw", "Value": "NA"},
            {"Type": "TERM_MATCH", "Field": "capacitystatus", "Value": "Used"},
        ],
    }


@pytest.fixture
def price_list():
    pricing_client = client("pricing")
    with Stubber(pricing_client) as stub:
        yield pricing_client, stub
        stub.assert_no_pending_responses()


def test_the_on_demand_price_is_the_price_lists_hourly_on_demand_term_for_linux_shared_tenancy(price_list):
    pricing_client, stub = price_list
    stub.add_response(
        "get_products",
        {"FormatVersion": "aws_v1", "PriceList": [price_list_product("g5.xlarge", "1.0240000000")]},
        expected_get_products("g5.xlarge"),
    )
    prices = Prices(ec2=client("ec2", region=REGION), region=REGION, pricing=pricing_client, cache=MemoryCache())

    assert prices.on_demand("g5.xlarge") == Quote(1.024, PRICE_LIST), "the OnDemand term, not the Reserved one"
    assert not prices.used_built_in


def test_a_list_price_is_asked_once_then_served_from_the_cache(price_list):
    pricing_client, stub = price_list
    stub.add_response("get_products", {"PriceList": [price_list_product("g6.xlarge", "0.8050000000")]})
    cache = MemoryCache()
    first = Prices(ec2=client("ec2", region=REGION), region=REGION, pricing=pricing_client, cache=cache)
    second = Prices(ec2=client("ec2", region=REGION), region=REGION, pricing=pricing_client, cache=cache)

    assert first.on_demand("g6.xlarge").usd == 0.805
    assert second.on_demand("g6.xlarge") == Quote(0.805, PRICE_LIST), "a second GetProducts would find no stub"


def test_a_cached_list_price_expires_after_a_day(price_list):
    pricing_client, stub = price_list
    for usd in ("0.8050000000", "0.8100000000"):
        stub.add_response("get_products", {"PriceList": [price_list_product("g6.xlarge", usd)]})
    now = [1_000_000.0]
    cache = MemoryCache(clock=lambda: now[0])

    assert Prices(ec2=None, region=REGION, pricing=pricing_client, cache=cache).on_demand("g6.xlarge").usd == 0.805
    now[0] += 24 * 3600 + 1
    assert Prices(ec2=None, region=REGION, pricing=pricing_client, cache=cache).on_demand("g6.xlarge").usd == 0.81


def test_without_the_price_list_api_the_built_in_table_answers_and_says_why_once(price_list):
    pricing_client, stub = price_list
    stub.add_client_error("get_products", "AccessDeniedException", "not authorized to perform pricing:GetProducts")
    prices = Prices(ec2=None, region=REGION, pricing=pricing_client, cache=MemoryCache())

    assert prices.on_demand("g5.xlarge") == Quote(pricing.on_demand_price("g5.xlarge"), BUILT_IN)
    assert prices.on_demand("g6.xlarge") == Quote(0.805, BUILT_IN), "asked once: the API is not asked again"
    assert prices.used_built_in
    assert prices.fallback_reason == "the Price List API did not answer: AccessDeniedException"
    later = Prices(ec2=None, region=REGION, pricing=pricing_client, cache=prices.cache)
    assert later.on_demand("g5.xlarge").source == BUILT_IN, "not asked again for 10 minutes: no second stub needed"
    assert later.fallback_reason == prices.fallback_reason


def test_a_type_neither_aws_nor_the_table_knows_has_no_price():
    prices = Prices(ec2=None, region=REGION, pricing=None, cache=MemoryCache())

    assert prices.on_demand("g7.mega") == Quote(None, "unknown")
    assert prices.fallback_reason == "no Price List client"


def test_an_empty_price_list_answer_falls_back_for_that_type_only(price_list):
    pricing_client, stub = price_list
    stub.add_response("get_products", {"PriceList": []})
    stub.add_response("get_products", {"PriceList": [price_list_product("g6.xlarge", "0.8050000000")]})
    prices = Prices(ec2=None, region=REGION, pricing=pricing_client, cache=MemoryCache())

    assert prices.on_demand("g5.xlarge").source == BUILT_IN
    assert prices.on_demand("g6.xlarge") == Quote(0.805, PRICE_LIST)


def spot_entry(instance_type: str, zone: str, usd: str, when: datetime) -> dict:
    return {
        "AvailabilityZone": zone,
        "InstanceType": instance_type,
        "ProductDescription": "Linux/UNIX",
        "SpotPrice": usd,
        "Timestamp": when,
    }


def test_the_spot_price_of_a_pool_is_its_latest_entry_and_zones_outside_the_run_are_left_out():
    ec2 = client("ec2", region=REGION)
    early, late = datetime(2026, 11, 29, 6, 0, tzinfo=UTC), datetime(2026, 11, 29, 7, 0, tzinfo=UTC)
    with Stubber(ec2) as stub:
        stub.add_response(
            "describe_spot_price_history",
            {
                "SpotPriceHistory": [
                    spot_entry("g5.xlarge", "eu-west-1a", "0.4100", late),
                    spot_entry("g5.xlarge", "eu-west-1a", "0.3900", early),
                    spot_entry("g5.xlarge", "eu-west-1c", "0.2000", late),
                    spot_entry("g6.xlarge", "eu-west-1b", "0.3300", early),
                ]
            },
            {
                "InstanceTypes": ["g5.xlarge", "g6.xlarge"],
                "ProductDescriptions": ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
                "StartTime": ANY,
            },
        )
        prices = Prices(ec2=ec2, region=REGION, cache=MemoryCache())
        spot = prices.spot(["g6.xlarge", "g5.xlarge"], ["eu-west-1a", "eu-west-1b"])
        again = prices.spot(["g5.xlarge", "g6.xlarge"], ["eu-west-1a"])  # cached: no second call

    assert spot == {("g5.xlarge", "eu-west-1a"): 0.41, ("g6.xlarge", "eu-west-1b"): 0.33}
    assert again == {("g5.xlarge", "eu-west-1a"): 0.41}
    priced = prices.pool_prices("spot", [("g5.xlarge", "eu-west-1a"), ("g6.xlarge", "eu-west-1a")])  # cached too
    assert priced == {
        ("g5.xlarge", "eu-west-1a"): Quote(0.41, SPOT_HISTORY),
        ("g6.xlarge", "eu-west-1a"): Quote(None, NO_SPOT_PRICE),
    }


def test_the_cache_keeps_answers_of_different_endpoints_apart(price_list):
    """The local AWS's made-up prices must never stand in for AWS's (the EC2 endpoint says which AWS)."""
    pricing_client, stub = price_list
    stub.add_response("get_products", {"PriceList": [price_list_product("g5.xlarge", "1.0060000000")]})
    stub.add_response("get_products", {"PriceList": [price_list_product("g5.xlarge", "9.0000000000")]})
    cache = MemoryCache()
    aws_ec2, local_ec2 = client("ec2", region=REGION), client("ec2", region=REGION, endpoint="http://localhost:5999")

    assert Prices(ec2=aws_ec2, region=REGION, pricing=pricing_client, cache=cache).on_demand("g5.xlarge").usd == 1.006
    assert Prices(ec2=local_ec2, region=REGION, pricing=pricing_client, cache=cache).on_demand("g5.xlarge").usd == 9.0


def test_the_price_list_client_is_made_only_when_a_price_is_not_cached(price_list):
    pricing_client, stub = price_list
    stub.add_response("get_products", {"PriceList": [price_list_product("g5.xlarge", "1.0060000000")]})
    cache, made = MemoryCache(), []

    def make():
        made.append(1)
        return pricing_client

    for _ in range(3):
        assert Prices(ec2=None, region=REGION, pricing=make, cache=cache).on_demand("g5.xlarge").usd == 1.006
    assert made == [1]


def test_the_cli_file_cache_survives_the_process_and_expires(tmp_path, monkeypatch):
    path = tmp_path / "prices.json"
    pricing.FileCache(path).put("k", [["g5.xlarge", "us-east-1a", 0.4]])

    assert pricing.FileCache(path).get("k", 60) == [["g5.xlarge", "us-east-1a", 0.4]]
    later = os.path.getmtime(path) + 61
    monkeypatch.setattr(pricing.time, "time", lambda: later)
    assert pricing.FileCache(path).get("k", 60) is None


def test_a_broken_or_unwritable_cache_file_is_an_empty_cache(tmp_path):
    broken = tmp_path / "prices.json"
    broken.write_text("{not json")
    assert pricing.FileCache(broken).get("k", 60) is None

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    cache = pricing.FileCache(blocked / "prices.json")
    cache.put("k", 1.0)  # cannot write under a file: no error, the value still serves this process
    assert cache.get("k", 60) == 1.0


def test_the_cli_cache_lives_under_the_users_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pricing.FileCache().path == tmp_path / "training-infra" / "prices.json"


@pytest.mark.parametrize(
    ("usd", "text"), [(0.6, "$0.60"), (1.006, "$1.006"), (55.04, "$55.04"), (0.00001, "$0.00001"), (12, "$12.00")]
)
def test_prices_are_printed_in_cents_with_more_digits_only_when_they_have_them(usd, text):
    assert dollars(usd) == text


def test_under_the_cap_keeps_pools_at_or_under_it_and_those_without_a_price_and_names_the_cheapest():
    priced = {
        ("g5.xlarge", "a"): Quote(0.61, SPOT_HISTORY),
        ("g5.xlarge", "b"): Quote(0.60, SPOT_HISTORY),
        ("g6.xlarge", "a"): Quote(None, "unknown"),
        ("g6.xlarge", "b"): Quote(None, NO_SPOT_PRICE),
    }
    fitting, cheapest = under_cap(priced, 0.60)
    assert fitting == [("g5.xlarge", "b"), ("g6.xlarge", "a")], (
        "at the cap fits; no list price is left to the fleet's cap; a pool without spot is not offered"
    )
    assert cheapest == (("g5.xlarge", "b"), 0.60)
    assert cap_message(0.5, (("g5.xlarge", "b"), 0.6, "spot")) == (
        "no pool at or under the price cap of $0.50/hour: the cheapest seen is $0.60/hour (g5.xlarge, spot, b)"
    )


def test_the_supervisors_lambda_package_imports_only_the_standard_library_boto3_its_layer_and_itself():
    """The Lambda's package is runtime/ plus the Optuna layer (requirements-lambda.txt): any other third-party
    import there would fail only in AWS."""
    own = {path.stem for path in RUNTIME_DIR.glob("*.py")}
    pins = (Path(__file__).resolve().parents[1] / "requirements-lambda.txt").read_text().splitlines()
    own |= {line.split("==")[0].strip() for line in pins if "==" in line and not line.startswith("#")}
    for path in RUNTIME_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in {"boto3", "botocore", "training_infra"} | own, (
                    f"{path.name} imports {name}"
                )


def test_the_lambda_imports_the_price_module_as_a_sibling_as_aws_loads_it():
    """In Lambda, runtime/ is the import root: `from prices import ...`, not the package path the CLI uses."""
    probe = "import supervisor; print(supervisor.Prices.__module__, supervisor.PRICE_LIST_REGION)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=RUNTIME_DIR, capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["prices", "us-east-1"]
