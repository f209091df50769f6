"""Hourly prices from AWS: on-demand list prices (the Price List API) and the latest spot prices.

Stdlib and boto3 only: this folder is the supervisor's whole Lambda package; the CLI imports it
through `training_infra/pricing.py` (as records.py is shared). Answers are cached: in memory for
the life of a Lambda container, in a small file for the CLI (the cache is passed in). The built-in
table is only the fallback when the Price List API cannot answer (no network to it, no
permission, the local AWS), and whoever prints a price says so once (`BUILT_IN_NOTE`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

# The Price List API answers in us-east-1 for every region (also ap-south-1, eu-central-1).
PRICE_LIST_REGION = "us-east-1"
LIST_PRICE_TTL_SECONDS = 24 * 3600  # list prices change a few times a year
SPOT_PRICE_TTL_SECONDS = 300  # spot prices move at most every few minutes
UNANSWERED_TTL_SECONDS = 600  # a Price List API that did not answer is not asked again for this long
SPOT_PRODUCTS = ("Linux/UNIX", "Linux/UNIX (Amazon VPC)")
BUILT_IN_NOTE = "list price from the built-in table"
PRICE_LIST = "price list"
BUILT_IN = "built-in table"
SPOT_HISTORY = "spot history"
NO_SPOT_PRICE = "no spot price"  # AWS quotes none for the pool: spot is not sold there

# Linux on-demand USD per hour in us-east-1 (AWS price list, 2026): the offline fallback only.
# Other regions differ by a few per cent.
BUILT_IN_ON_DEMAND: dict[str, float] = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204, "g4dn.8xlarge": 2.176,
    "g4dn.12xlarge": 3.912, "g4dn.16xlarge": 4.352, "g4dn.metal": 7.824,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.8xlarge": 2.448,
    "g5.12xlarge": 5.672, "g5.16xlarge": 4.096, "g5.24xlarge": 8.144, "g5.48xlarge": 16.288,
    "g6.xlarge": 0.805, "g6.2xlarge": 0.978, "g6.4xlarge": 1.323, "g6.8xlarge": 2.014,
    "g6.12xlarge": 4.602, "g6.16xlarge": 3.397, "g6.24xlarge": 6.675, "g6.48xlarge": 13.35,
    "g6e.xlarge": 1.861, "g6e.2xlarge": 2.242, "g6e.4xlarge": 3.004, "g6e.8xlarge": 4.529,
    "g6e.12xlarge": 10.493, "g6e.16xlarge": 7.577, "g6e.24xlarge": 15.066, "g6e.48xlarge": 30.131,
    "p3.2xlarge": 3.06, "p3.8xlarge": 12.24, "p3.16xlarge": 24.48,
    "p4d.24xlarge": 21.958, "p5.48xlarge": 55.04,
    "t3.micro": 0.0104, "t3.small": 0.0208, "t3.medium": 0.0416, "t3.large": 0.0832,
    "m5.large": 0.096, "m5.xlarge": 0.192, "c5.large": 0.085, "c5.xlarge": 0.17,
}  # fmt: skip


class Cache(Protocol):
    """Where answers are kept between calls: `get` returns None when absent or older than max_age."""

    def get(self, key: str, max_age: float) -> Any: ...

    def put(self, key: str, value: Any) -> None: ...


@dataclass
class MemoryCache:
    """Answers kept for the life of the process (a Lambda container serves many invocations)."""

    clock: Callable[[], float] = time.time
    entries: dict[str, tuple[float, Any]] = field(default_factory=dict)

    def get(self, key: str, max_age: float) -> Any:
        saved = self.entries.get(key)
        return saved[1] if saved and self.clock() - saved[0] <= max_age else None

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = (self.clock(), value)


CONTAINER_CACHE = MemoryCache()  # the supervisor Lambda's: one per container


@dataclass(frozen=True)
class Quote:
    """One hourly price and where it came from (price list | built-in table | spot history), None if unknown."""

    usd: float | None
    source: str


def dollars(usd: float) -> str:
    """$0.60, $1.006, $0.00001: cents always, more digits only when the price has them."""
    whole, _, fraction = f"{usd:.5f}".rstrip("0").partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def price_list_filters(instance_type: str, region: str) -> list[dict[str, str]]:
    """The one product that is this type's Linux on-demand price: shared tenancy, no SQL, capacity in use."""
    fields = {
        "instanceType": instance_type,
        "regionCode": region,
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
    }
    return [{"Type": "TERM_MATCH", "Field": name, "Value": value} for name, value in fields.items()]


def on_demand_from_price_list(price_list: Iterable[str]) -> float | None:
    """The hourly USD price in GetProducts' answer: each entry is a JSON document (product, terms)."""
    for document in price_list:
        product = json.loads(document) if isinstance(document, str) else document
        for term in product.get("terms", {}).get("OnDemand", {}).values():
            for dimension in term.get("priceDimensions", {}).values():
                if dimension.get("unit") != "Hrs":
                    continue
                try:
                    usd = float(dimension.get("pricePerUnit", {}).get("USD", ""))
                except ValueError:
                    continue
                if usd > 0:
                    return usd
    return None


def _why(error: Exception) -> str:
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        return code if code and not code.isdigit() else f"HTTP {code or '?'}"
    return type(error).__name__


class Prices:
    """Prices for one region: `on_demand(type)` and `spot(types, zones)`, each asked once per cache period.

    `pricing` is a Price List client (us-east-1), a function that makes one when a price is not
    cached (making a client costs more than a cached answer), or None where there is none: then
    every list price comes from the built-in table and `fallback_reason` says why.
    """

    def __init__(
        self, *, ec2: Any, region: str, pricing: Any | Callable[[], Any] | None = None, cache: Cache | None = None
    ) -> None:
        self.ec2, self.region, self._pricing = ec2, region, pricing
        self.cache = cache if cache is not None else CONTAINER_CACHE
        self.fallback_reason = "" if pricing is not None else "no Price List client"
        self.used_built_in = False

    @property
    def pricing(self) -> Any:
        if self._pricing is not None and not hasattr(self._pricing, "get_products"):
            self._pricing = self._pricing()  # the factory, called once
        return self._pricing

    def _key(self, *parts: str) -> str:
        # Which AWS answered is part of the key (the EC2 endpoint): the local AWS's answers never
        # stand in for AWS's.
        endpoint = getattr(getattr(self.ec2, "meta", None), "endpoint_url", "") or ""
        return "|".join((endpoint, self.region, *parts))

    def on_demand(self, instance_type: str) -> Quote:
        if not self.fallback_reason:
            self.fallback_reason = self.cache.get(self._key("price-list-unanswered"), UNANSWERED_TTL_SECONDS) or ""
        if not self.fallback_reason:
            key = self._key("on-demand", instance_type)
            cached = self.cache.get(key, LIST_PRICE_TTL_SECONDS)
            if cached is not None:
                return Quote(float(cached), PRICE_LIST)
            try:
                answer = self.pricing.get_products(
                    ServiceCode="AmazonEC2",
                    Filters=price_list_filters(instance_type, self.region),
                    FormatVersion="aws_v1",
                    MaxResults=10,
                )
            except (ClientError, BotoCoreError) as error:
                self.fallback_reason = f"the Price List API did not answer: {_why(error)}"
                self.cache.put(self._key("price-list-unanswered"), self.fallback_reason)
            else:
                usd = on_demand_from_price_list(answer.get("PriceList", []))
                if usd is not None:
                    self.cache.put(key, usd)
                    return Quote(usd, PRICE_LIST)
        usd = BUILT_IN_ON_DEMAND.get(instance_type)
        if usd is None:
            return Quote(None, "unknown")
        self.used_built_in = True
        return Quote(usd, BUILT_IN)

    def spot(self, instance_types: Iterable[str], zones: Iterable[str]) -> dict[tuple[str, str], float]:
        """The spot price in effect now for each (type, zone) AWS quotes; pools it does not quote are absent."""
        types, wanted = sorted(set(instance_types)), set(zones)
        key = self._key("spot", ",".join(types))
        cached = self.cache.get(key, SPOT_PRICE_TTL_SECONDS)
        if cached is None:
            # With a start time, AWS also returns the last change before it: the price in effect now.
            paginator = self.ec2.get_paginator("describe_spot_price_history")
            latest: dict[tuple[str, str], tuple[datetime, float]] = {}
            for page in paginator.paginate(
                InstanceTypes=types, ProductDescriptions=list(SPOT_PRODUCTS), StartTime=datetime.now(UTC)
            ):
                for entry in page.get("SpotPriceHistory", []):
                    pool = (entry.get("InstanceType", ""), entry.get("AvailabilityZone", ""))
                    moment = entry.get("Timestamp") or datetime.min.replace(tzinfo=UTC)
                    if pool not in latest or moment > latest[pool][0]:
                        latest[pool] = (moment, float(entry["SpotPrice"]))
            cached = [[t, z, price] for (t, z), (_moment, price) in sorted(latest.items())]
            self.cache.put(key, cached)
        return {(t, z): float(price) for t, z, price in cached if z in wanted}

    def pool_prices(self, market: str, pools: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Quote]:
        """(type, zone) -> the hourly price an instance there would pay in `market` (spot | on-demand)."""
        pools = list(pools)
        if market == "spot":
            spot = self.spot([t for t, _ in pools], [z for _, z in pools])
            return {pool: Quote(spot.get(pool), SPOT_HISTORY if pool in spot else NO_SPOT_PRICE) for pool in pools}
        return {(t, z): self.on_demand(t) for t, z in pools}


def under_cap(
    priced: dict[tuple[str, str], Quote], cap: float
) -> tuple[list[tuple[str, str]], tuple[tuple[str, str], float] | None]:
    """Pools at or under the cap, and the cheapest known pool with its price (to name when nothing fits).

    A type with no list price anywhere stays (the fleet's own MaxTotalPrice holds it to the cap); a
    spot pool AWS quotes no price for does not (spot is not sold there).
    """
    fitting = [
        pool
        for pool, quote in priced.items()
        if (quote.usd is None and quote.source != NO_SPOT_PRICE) or (quote.usd is not None and quote.usd <= cap)
    ]
    known = [(pool, quote.usd) for pool, quote in priced.items() if quote.usd is not None]
    cheapest = min(known, key=lambda item: (item[1], item[0])) if known else None
    return fitting, cheapest


def cap_message(cap: float, cheapest: tuple[tuple[str, str], float, str] | None) -> str:
    """Why no pool may be offered: the cheapest price seen (type, market, zone) and the cap."""
    if cheapest is None:
        return f"no pool at or under the price cap of {dollars(cap)}/hour"
    (instance_type, zone), usd, market = cheapest
    return (
        f"no pool at or under the price cap of {dollars(cap)}/hour: the cheapest seen is {dollars(usd)}/hour "
        f"({instance_type}, {market}, {zone})"
    )
