"""Capacity Blocks for ML: a run launched into a block the user bought (`launch --capacity-reservation cr-...`).

How EC2 takes it (EC2 User Guide, "Launch instances using Capacity Blocks" and "Tutorial: Configure your EC2 Fleet
to launch instances into Capacity Blocks"): the launch template says `InstanceMarketOptions.MarketType =
capacity-block` and targets the block with `CapacityReservationSpecification.CapacityReservationTarget.
CapacityReservationId`; an EC2 Fleet of type `instant` (the only type allowed for blocks) asks for
`DefaultTargetCapacityType = capacity-block`, one block per request, no OnDemand/Spot target counts and no
`OnDemandOptions.CapacityReservationOptions`; the subnet must be in the block's zone. Before the block starts the
fleet answers InsufficientInstanceCapacity, which the supervisor already treats as "wait and retry each minute".

Forty minutes before the end EC2 sends the Capacity Block expiration warning (capacity.BLOCK_EXPIRING: capacity.py
stops the block's runs gracefully on it) and begins terminating the block's instances ten minutes later: so a run's
deadline is clipped to `end - TERMINATES_BEFORE_END - stop timeout`, room for one graceful stop before EC2 ends the box.

Money: a block is prepaid when bought (`capacity buy`, its fee is the offering's UpfrontFee); running in it costs
nothing more per hour but the volume, so the run's compute price is 0 (docs/architecture.md, "Capacity Blocks").

Stdlib and boto3 only (this folder is the supervisor's Lambda package).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

try:  # the Lambda package is this folder; the CLI imports it as part of training_infra
    from records import BLOCK_MARKET, RESERVATION_ID
except ImportError:  # pragma: no cover - exercised by the CLI and the tests
    from training_infra.supervisor.runtime.records import BLOCK_MARKET, RESERVATION_ID

# EC2 begins terminating a block's instances this long before its end date (the Expiration Warning's "in 10
# minutes", sent 40 minutes before the end).
TERMINATES_BEFORE_END = timedelta(minutes=30)
# States in which a block can still hold the run: running now, or paid for and starting later.
USABLE_STATES = ("active", "scheduled")
# The tag `capacity buy` puts on the block it buys; the supervisor may launch only into a block with it (its IAM
# condition on capacity-reservation/*, aws:ResourceTag), so a run cannot spend another team's block of the account.
MANAGED_TAG = "training-infra:managed"
ALLOWED = "a Capacity Block reservation id such as cr-0123456789abcdef0"


class BlockRefused(ValueError):
    """A reservation that cannot hold the run; the message is one line naming the reservation and why."""


def reservation_id(value: Any, option: str = "--capacity-reservation") -> str:
    """The id's one check, for the CLI's flag, the spec's key and the request function alike."""
    if not isinstance(value, str) or not RESERVATION_ID.match(value):
        raise BlockRefused(f"option '{option}': got {value!r}; allowed: {ALLOWED}")
    return value


@dataclass(frozen=True)
class Block:
    """One DescribeCapacityReservations answer, typed."""

    reservation_id: str
    instance_type: str
    zone: str
    state: str
    kind: str  # ReservationType: capacity-block, or default for an On-Demand Capacity Reservation
    total: int
    available: int
    start: datetime | None
    end: datetime | None
    managed: bool = False  # tagged training-infra:managed=true (bought with `capacity buy`)

    @classmethod
    def from_answer(cls, item: Mapping[str, Any]) -> Block:
        return cls(
            reservation_id=item.get("CapacityReservationId", ""),
            instance_type=item.get("InstanceType", ""),
            zone=item.get("AvailabilityZone", ""),
            state=item.get("State", ""),
            kind=item.get("ReservationType", "default"),
            total=int(item.get("TotalInstanceCount") or 0),
            available=int(item.get("AvailableInstanceCount") or 0),
            start=item.get("StartDate"),
            end=item.get("EndDate"),
            managed=any(t.get("Key") == MANAGED_TAG and t.get("Value") == "true" for t in item.get("Tags") or []),
        )

    def usable_until(self, stop_timeout_seconds: int) -> datetime | None:
        """The latest deadline a run in this block may have: one graceful stop before EC2 begins terminating."""
        if self.end is None:
            return None
        return self.end - TERMINATES_BEFORE_END - timedelta(seconds=stop_timeout_seconds)

    def words(self) -> str:
        """`cr-... p5.48xlarge x1 in us-east-1a, active, ends 2026-12-06T11:30Z`, for the launch output."""
        end = f", ends {self.end:%Y-%m-%dT%H:%MZ}" if self.end else ""
        return f"{self.reservation_id} {self.instance_type} x{self.total} in {self.zone}, {self.state}{end}"


def describe(ec2: Any, reservation: str) -> Block:
    """The reservation as EC2 describes it; a missing or unreadable one is refused in one line."""
    try:
        found = ec2.describe_capacity_reservations(CapacityReservationIds=[reservation]).get("CapacityReservations")
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        raise BlockRefused(f"capacity reservation {reservation}: EC2 says {code} (not in this account and region, "
                           "or not allowed to describe it)") from None  # fmt: skip
    except BotoCoreError as error:
        raise BlockRefused(f"capacity reservation {reservation}: not described ({error})") from None
    if not found:
        raise BlockRefused(f"capacity reservation {reservation}: not found in this account and region")
    return Block.from_answer(found[0])


def problem(block: Block, instance_types: Sequence[str], nodes: int, now: datetime, floor: timedelta,
            stop_timeout_seconds: int, zones: Sequence[str] | None = None,
            deadline: datetime | None = None) -> str:  # fmt: skip
    """Why the block cannot hold the run ("" when it can): one line, the block's value and what is allowed.
    `deadline`: the run's own, before clipping; a block that starts too late for it would only make the run wait."""
    name = f"capacity reservation {block.reservation_id}"
    if block.kind != BLOCK_MARKET:
        return f"{name}: is a {block.kind} reservation; allowed: a Capacity Block (ReservationType capacity-block)"
    if not block.managed:
        return (f"{name}: has no tag {MANAGED_TAG}=true; allowed: a block bought with `training-infra capacity buy` "
                "(it tags the block), or one bought before or another way once its buyer ran `aws ec2 create-tags "
                f"--resources {block.reservation_id} --tags Key={MANAGED_TAG},Value=true` (its fee is then not in "
                "the month's ledger)")  # fmt: skip
    if block.state not in USABLE_STATES:
        return f"{name}: is {block.state}; allowed: an active or scheduled Capacity Block"
    if block.instance_type not in instance_types:
        return (f"{name}: holds {block.instance_type}; allowed: a block of the run's instance types "
                f"{', '.join(instance_types)} (pass --instance-type {block.instance_type})")  # fmt: skip
    if nodes > block.total:
        return f"{name}: holds {block.total} instance(s); the run needs {nodes}"
    if zones is not None and block.zone not in zones:
        return f"{name}: is in {block.zone}; allowed: a zone of the stack's subnets ({', '.join(zones) or 'none'})"
    until = block.usable_until(stop_timeout_seconds)
    if until is None:
        return f"{name}: has no end date; allowed: a Capacity Block"
    begins = max(now, block.start or now)
    if until - begins < floor:
        return (f"{name}: ends {block.end:%Y-%m-%dT%H:%MZ}: less than boot + one checkpoint interval "
                f"({floor.total_seconds() / 60:g} min) is left before EC2 ends its instances")  # fmt: skip
    if deadline is not None and begins + floor > deadline:
        return (f"{name}: starts {begins:%Y-%m-%dT%H:%MZ}, too late for the run's deadline {deadline:%Y-%m-%dT%H:%MZ}; "
                "allowed: a block that starts within --max-runtime-hours")  # fmt: skip
    return ""


def clip(deadline: datetime, block: Block, stop_timeout_seconds: int) -> datetime:
    until = block.usable_until(stop_timeout_seconds)
    return min(deadline, until) if until else deadline


def template_data(data: Mapping[str, Any], reservation: str) -> dict[str, Any]:
    """A run template's data for the block: market capacity-block, targeted at this reservation only."""
    return {
        **data,
        "InstanceMarketOptions": {"MarketType": BLOCK_MARKET},
        "CapacityReservationSpecification": {"CapacityReservationTarget": {"CapacityReservationId": reservation}},
    }


def fleet_request(request: dict[str, Any]) -> dict[str, Any]:
    """An instant fleet's request made a block's: capacity-block default, no spot/on-demand options or price cap."""
    out = {k: v for k, v in request.items() if k not in ("SpotOptions", "OnDemandOptions")}
    out["TargetCapacitySpecification"] = {**request["TargetCapacitySpecification"],
                                          "DefaultTargetCapacityType": BLOCK_MARKET}  # fmt: skip
    return out
