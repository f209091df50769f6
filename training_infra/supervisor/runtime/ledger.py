"""What a run has cost: each attempt's price times its time, plus its volume (docs/architecture.md, "Costs").

The supervisor prices an attempt once, when it ends, and keeps the figure on the attempt; `status`
and `cost` read those figures and price only the attempts still open. Spot attempts are priced
from the spot price history in effect while they ran (time-weighted), on-demand attempts at the
list price the run's spec recorded at launch, and attempts with neither at the agent's estimate.

Stdlib and boto3 only: this folder is the supervisor's Lambda package; the CLI imports it too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

try:  # the Lambda package is this folder; the CLI imports it as part of training_infra
    from records import BLOCK_MARKET, Attempt, MonthlyLedger, OverLimit, RunSpec, StaleRecord, parse_iso
except ImportError:  # pragma: no cover - exercised by the CLI and the tests
    from training_infra.supervisor.runtime.records import (
        BLOCK_MARKET,
        Attempt,
        MonthlyLedger,
        OverLimit,
        RunSpec,
        StaleRecord,
        parse_iso,
    )

# gp3 list price (us-east-1) per GB-month, and AWS's month for per-hour figures.
EBS_USD_PER_GB_MONTH = 0.08
HOURS_PER_MONTH = 730
SPOT_PRODUCTS = ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"]


def time_weighted_cost(history: Sequence[tuple[datetime, float]], start: datetime, end: datetime) -> float | None:
    """USD for [start, end] under a price that changes at the history's timestamps.

    The price in effect at `start` is the last change at or before it (or the first one known);
    each later change applies from its timestamp on.
    """
    if not history:
        return None
    points = sorted(history)
    current = points[0][1]
    for moment, price in points:
        if moment <= start:
            current = price
    cost, cursor = 0.0, start
    for moment, price in points:
        if start < moment < end:
            cost += current * (moment - cursor).total_seconds() / 3600
            cursor, current = moment, price
    return cost + max(0.0, current * (end - cursor).total_seconds() / 3600)


class SpotHistory:
    """Spot prices over one window, asked once per (type, zone) however many attempts need them.

    botocore clients are thread-safe: `prefetch` asks for several pools at once.
    """

    def __init__(self, ec2: Any, start: datetime, end: datetime) -> None:
        self._ec2 = ec2
        # Entries from before `start` tell which price was in effect when the window began.
        self.start, self.end = start - timedelta(days=1), end
        self._cache: dict[tuple[str, str], list[tuple[datetime, float]]] = {}

    def prices(self, instance_type: str, zone: str) -> list[tuple[datetime, float]]:
        key = (instance_type, zone)
        if key not in self._cache:
            self._cache[key] = self._ask(instance_type, zone)
        return self._cache[key]

    def prefetch(self, pools: Iterable[tuple[str, str]]) -> None:
        wanted = sorted({pool for pool in pools if pool[0] and pool not in self._cache})
        if len(wanted) < 2:
            for pool in wanted:
                self.prices(*pool)
            return
        with ThreadPoolExecutor(max_workers=min(8, len(wanted))) as workers:
            for pool, prices in zip(wanted, workers.map(lambda pool: self._ask(*pool), wanted), strict=True):
                self._cache[pool] = prices

    def _ask(self, instance_type: str, zone: str) -> list[tuple[datetime, float]]:
        paginator = self._ec2.get_paginator("describe_spot_price_history")
        pages = paginator.paginate(
            InstanceTypes=[instance_type],
            ProductDescriptions=SPOT_PRODUCTS,
            StartTime=self.start,
            EndTime=self.end,
            **({"AvailabilityZone": zone} if zone else {}),
        )
        entries = [
            e for page in pages for e in page.get("SpotPriceHistory", []) if e.get("InstanceType") == instance_type
        ]
        in_zone = [e for e in entries if e.get("AvailabilityZone") == zone] if zone else []
        chosen = in_zone or entries
        return [(_moment(e["Timestamp"]) or self.start, float(e["SpotPrice"])) for e in chosen]


class RecentSpotHistory(SpotHistory):
    """The supervisor's per-minute spend check: each pool's history asked at most every five minutes
    in a warm Lambda (prices change a few times a day; the ended attempt is priced exactly later)."""

    TTL_SECONDS = 300
    _shared: ClassVar[dict[tuple[str, str, str], tuple[datetime, float, list[tuple[datetime, float]]]]] = {}

    def prices(self, instance_type: str, zone: str) -> list[tuple[datetime, float]]:
        key = (self._ec2.meta.endpoint_url, instance_type, zone)  # one region's prices, whichever client asks
        hit = self._shared.get(key)
        if hit and hit[0] <= self.start and time.monotonic() - hit[1] < self.TTL_SECONDS:
            return hit[2]
        prices = self._ask(instance_type, zone)
        self._shared[key] = (self.start, time.monotonic(), prices)
        return prices


def _moment(value: Any) -> datetime | None:
    return value if isinstance(value, datetime) else parse_iso(str(value))


@dataclass(frozen=True)
class AttemptCost:
    hours: float
    usd: float | None  # compute and volume
    on_demand_usd: float | None  # the same hours at the list price, for the saving spot brought
    hourly_usd: float | None  # the price in effect at the attempt's end (or now)
    source: str  # spot history | on-demand list | agent estimate | unknown


def attempt_window(attempt: Attempt, now: datetime) -> tuple[datetime, datetime] | None:
    """When the attempt's instance ran: from its launch to its end (or now, while it runs)."""
    start = parse_iso(attempt.started_at)
    if start is None or not attempt.instance_id:
        return None
    end = parse_iso(attempt.ended_at) or now
    return start, max(start, end)


def volume_usd_per_hour(volume_gb: int) -> float:
    return volume_gb * EBS_USD_PER_GB_MONTH / HOURS_PER_MONTH


def price_attempt(attempt: Attempt, spec: RunSpec, now: datetime, spot: SpotHistory | None) -> AttemptCost:
    """What the attempt cost from its start to its end (or now)."""
    window = attempt_window(attempt, now)
    if window is None:
        return AttemptCost(0.0, None, None, None, "unknown")
    start, end = window
    hours = (end - start).total_seconds() / 3600
    instance_type = attempt.instance_type
    list_price = _positive(spec.list_prices.get(instance_type))
    agent_price = _positive(attempt.price_usd)
    on_demand_rate = list_price if list_price is not None else agent_price
    on_demand = on_demand_rate * hours if on_demand_rate is not None else None
    volume = volume_usd_per_hour(spec.volume_gb) * hours
    if attempt.market == BLOCK_MARKET:  # prepaid at purchase: the hours in the block cost nothing more (blocks.py)
        return AttemptCost(hours, volume, None, 0.0, "capacity block (prepaid)")
    if attempt.market == "spot" and spot is not None and instance_type:
        history = spot.prices(instance_type, attempt.zone)
        compute = time_weighted_cost(history, start, end)
        if compute is not None:
            in_effect = [price for moment, price in sorted(history) if moment <= end] or [history[0][1]]
            return AttemptCost(hours, compute + volume, on_demand, in_effect[-1], "spot history")
    if list_price is not None and attempt.market != "spot":
        return AttemptCost(hours, list_price * hours + volume, on_demand, list_price, "on-demand list")
    if agent_price is not None:
        return AttemptCost(hours, agent_price * hours + volume, on_demand, agent_price, "agent estimate")
    if list_price is not None:  # a spot attempt without history: the list price is its upper bound
        return AttemptCost(hours, list_price * hours + volume, on_demand, list_price, "on-demand list")
    return AttemptCost(hours, None, None, None, "unknown")


def recorded_or_priced(attempt: Attempt, spec: RunSpec, now: datetime, spot: SpotHistory | None) -> AttemptCost:
    """An ended attempt's recorded figure (the supervisor priced it once), else priced now."""
    window = attempt_window(attempt, now)
    if attempt.ended_at and attempt.priced and window is not None:
        hours = (window[1] - window[0]).total_seconds() / 3600
        return AttemptCost(
            hours, attempt.cost_usd, attempt.on_demand_usd, attempt.hourly_usd, attempt.price_source or "unknown"
        )
    return price_attempt(attempt, spec, now, spot)


def record_price(attempt: Attempt, cost: AttemptCost) -> None:
    """Keep an ended attempt's cost on it: `status` and `cost` read it instead of pricing it again."""
    attempt.priced, attempt.cost_usd, attempt.on_demand_usd = True, cost.usd, cost.on_demand_usd
    attempt.hourly_usd, attempt.price_source = cost.hourly_usd, cost.source


def spent_under_limit(spec: RunSpec, total_usd: float) -> float:
    """What counts against the run's --max-cost-usd: a resumed run's limit counts from its resume."""
    return total_usd - spec.spent_before_usd


def left_under_limit(spec: RunSpec, total_usd: float) -> float:
    """Dollars the run may still spend under its --max-cost-usd (0 when it has reached it)."""
    return max(0.0, (spec.max_cost_usd or 0.0) - spent_under_limit(spec, total_usd))


def share_inside(began: datetime, seconds: float, start: datetime, now: datetime) -> tuple[float, float] | None:
    """(seconds inside [start, now], share of the attempt's cost) of an attempt of `seconds` from `began`;
    None when it lies wholly outside. An attempt that straddles `start` counts pro rata."""
    ended = began + timedelta(seconds=seconds)
    inside = (min(ended, now) - max(began, start)).total_seconds()
    if inside <= 0 and ended > began:
        return None
    if ended <= began:
        return 0.0, 1.0
    return max(0.0, inside), min(1.0, inside / (ended - began).total_seconds())


def _positive(value: Any) -> float | None:
    found = number(value)
    return found if found is not None and found > 0 else None


def number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class BlockFees:
    """Capacity Block fees in the month's ledger item (`#month-YYYY-MM`, records.MonthlyLedger), beside the runs.

    A block is prepaid: its runs are priced at their volume only (price_attempt), so its fee must count in the month
    once, when it is bought. `charge` is the limit check and the charge in one put conditional on the item's version
    (as a run's reservation): of two purchases that read the same remainder only one gets it, the other re-reads and
    is refused. The fee counts as spent from the charge on, before EC2 is asked: a buyer that dies between the two
    leaves the month over-counted, never under. `bought` notes the reservation EC2 made; `refund` takes the charge
    back when EC2 refused to sell. Entries: `blocks` (offering id -> fee, state, reservation, when).
    """

    def __init__(self, month_ledger: MonthlyLedger) -> None:
        self.ledger = month_ledger

    def entry(self, month: str, offering_id: str) -> dict[str, Any] | None:
        """The month's entry for an offering (fee, state, reservation, when, what, block), if any."""
        found = self.ledger.read(month).get("blocks", {}).get(offering_id)
        return dict(found) if isinstance(found, dict) else None

    def charge(
        self, month: str, offering_id: str, fee_usd: float, what: str, at: str, block: dict[str, Any] | None = None
    ) -> None:
        """Count the fee as spent this month, or raise OverLimit (one line: spent, reserved, left, the fee).
        `block`: what EC2 will make of it (type, zone, count, start, end): an interrupted purchase is found by it."""
        for _ in range(10):
            values = self.ledger.read(month)
            blocks = dict(values.get("blocks", {}))
            if offering_id in blocks:
                raise StaleRecord(f"Capacity Block offering {offering_id} is already charged in {month[1:]} "
                                  f"({blocks[offering_id].get('state', '?')})")  # fmt: skip
            spent = float(values["spent_usd"])
            reserved = sum(float(v) for v in values["reservations"].values())
            left = self.ledger.limit_usd - spent - reserved
            if self.ledger.limit_usd > 0 and fee_usd > left + 1e-9:
                raise OverLimit(
                    f"monthly_limit_usd {self.ledger.limit_usd:g}: spent ${spent:,.2f} and reserved ${reserved:,.2f} "
                    f"by active runs this month, ${max(0.0, left):,.2f} left"
                )
            blocks[offering_id] = {"fee_usd": round(fee_usd, 4), "state": "buying", "at": at, "what": what,
                                   **({"block": block} if block else {})}  # fmt: skip
            if self.ledger._put(month, values, blocks=blocks, spent_usd=round(spent + fee_usd, 4)):  # noqa: SLF001
                return
        raise StaleRecord(f"the {month} ledger kept changing; try again")

    def bought(self, month: str, offering_id: str, reservation_id: str) -> None:
        self._change(month, offering_id, lambda entry: {**entry, "state": "bought", "reservation": reservation_id})

    def refund(self, month: str, offering_id: str) -> None:
        """EC2 refused to sell: the charge goes (the fee was never paid)."""
        self._change(month, offering_id, None)

    def listed(self, month: str) -> list[dict[str, Any]]:
        """The month's block purchases, oldest first: offering id, fee, state, reservation, when, what."""
        blocks = self.ledger.read(month).get("blocks", {})
        return sorted(({"offering_id": k, **v} for k, v in blocks.items()), key=lambda b: str(b.get("at", "")))

    def _change(self, month: str, offering_id: str, change: Any) -> None:
        for _ in range(10):
            values = self.ledger.read(month)
            blocks = dict(values.get("blocks", {}))
            entry = blocks.get(offering_id)
            if entry is None:
                return
            spent = float(values["spent_usd"])
            if change is None:
                blocks.pop(offering_id)
                spent = round(max(0.0, spent - float(entry.get("fee_usd", 0))), 4)
            else:
                blocks[offering_id] = change(entry)
            if self.ledger._put(month, values, blocks=blocks, spent_usd=spent):  # noqa: SLF001
                return
        raise StaleRecord(f"the {month} ledger kept changing")
