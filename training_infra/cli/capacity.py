"""Capacity for users: why a managed run waits (`status RUN -v`), and Capacity Blocks (`capacity offers | buy`).

Why a run waits: each pool tried, EC2's last answer for it, cooldowns, the next try.
Read from the run record only (records.py): the supervisor keeps the per-pool errors of the last failed
try on the attempt (`Attempt.errors`, with `tries` counting a streak of them), the pools cooling down
after a reclaim on the run (`Run.cooldown`), and it tries again at each one-minute reconcile.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from training_infra import naming
from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError, UsageError, reported_errors
from training_infra.cli.render import Column, Listing, output_format, print_json

if TYPE_CHECKING:
    from training_infra.supervisor.runtime.records import Run

# The supervisor's modules (boto3's DynamoDB types) are imported by the functions that use them, so
# `training-infra --help`, which registers these verbs, stays fast.

RECONCILE_SECONDS = 60  # the supervisor's schedule (supervisor/construct.py)
# EC2's error codes in words a user acts on.
ANSWERS = {
    "InsufficientInstanceCapacity": "insufficient capacity",
    "InsufficientCapacity": "insufficient capacity",
    "UnfulfillableCapacity": "insufficient capacity",
    "MaxSpotInstanceCountExceeded": "max spot count: the account's spot vCPU quota is used up",
    "SpotMaxPriceTooLow": "price over the cap: the spot price is above --max-price",
    "VcpuLimitExceeded": "vCPU quota used up",
    "InsufficientFreeAddressesInSubnet": "no free IP address in the subnet",
    "LowPlacementScore": "not offered: spot placement score too low",  # capacity.LEFT_OUT (a test keeps them equal)
}
THROTTLED = "EC2 throttled or failed the request (it passes by itself)"


def answer_words(code: str) -> str:
    if code in ANSWERS:
        return ANSWERS[code]
    if code in ("RequestLimitExceeded", "Throttling", "ThrottlingException") or code.startswith(("Internal", "Serv")):
        return THROTTLED
    return code or "no answer recorded"


def waiting(run: Run, now: datetime) -> dict[str, Any] | None:
    """Why the run has no instance now, or None when it has one (or has ended)."""
    from training_infra.supervisor.runtime.records import AttemptEnd, RunState, iso, parse_iso

    if not run.active or run.state not in (RunState.LAUNCHING, RunState.RECOVERING):
        return None
    current = run.current
    if current is not None and current.instance_id:
        return None
    last = run.attempts[-1] if run.attempts else None
    pools = []
    if last is not None and last.end_reason == AttemptEnd.CAPACITY:
        for error in last.errors:
            pools.append(
                {
                    "pool": error.get("pool") or f"every pool ({error.get('market', '?')})",
                    "market": error.get("market", ""),
                    "code": error.get("code", ""),
                    "answer": answer_words(error.get("code", "")),
                    "message": error.get("message", ""),
                }
            )
    cooling = {
        pool: until for pool, until in sorted(run.cooldown.items()) if (parse_iso(until) or now) > now
    }  # fmt: skip
    tried_at = parse_iso(last.ended_at) if last is not None and last.end_reason == AttemptEnd.CAPACITY else None
    next_try = max(now, tried_at + timedelta(seconds=RECONCILE_SECONDS)) if tried_at else now
    deadline = parse_iso(run.deadline_at)
    return {
        "why": run.message,
        "tries": last.tries if last is not None and last.end_reason == AttemptEnd.CAPACITY else 0,
        "last_try_at": iso(tried_at) if tried_at else "",
        "pools": pools,
        "cooldown": cooling,
        "next_try_at": iso(next_try),
        "deadline_at": iso(deadline) if deadline else "",
    }


def waiting_lines(found: dict[str, Any] | None) -> list[str]:
    """The `status RUN -v` block: short lines, one per pool and cooldown."""
    if found is None:
        return []
    lines = ["why it waits:"]
    if found["tries"]:
        lines.append(f"  {found['tries']} tr{'y' if found['tries'] == 1 else 'ies'} without an instance; "
                     f"last {found['last_try_at']}")  # fmt: skip
    if found["pools"]:
        lines.append("  EC2's last answer per pool:")
        lines += [f"    {p['pool']} ({p['market']}): {p['answer']} [{p['code']}]" for p in found["pools"]]
    elif found["tries"]:
        lines.append(f"  {found['why']}")
    for pool, until in found["cooldown"].items():
        lines.append(f"  cooldown: {pool} until {until} (reclaimed there; other pools first)")
    lines.append(f"  next try: {found['next_try_at']} (the supervisor tries every minute until the deadline"
                 + (f" {found['deadline_at']})" if found["deadline_at"] else ")"))  # fmt: skip
    return lines


# ---- Capacity Blocks for ML: `capacity offers` and `capacity buy` -----------------------------------------

capacity_app = typer.Typer(
    name="capacity",
    help=(
        "Capacity Blocks for ML: `capacity offers` lists reserved GPU hours EC2 sells (start, end, price); "
        "`capacity buy OFFERING --yes` buys one, within the month's dollar limit."
    ),
    no_args_is_help=True,
)
Region = Annotated[
    str | None,
    typer.Option("--region", help="AWS region of the stacks (default: your profile's region).", show_default=False),
]
TypeOption = Annotated[str, typer.Option("--type", metavar="TYPE", help="Instance type, e.g. p5.48xlarge.")]
CountOption = Annotated[str, typer.Option("--count", metavar="N", help="Instances in the block.")]
HoursOption = Annotated[str, typer.Option("--hours", metavar="H", help="The block's length in hours, e.g. 24.")]
INSTANCE_PLATFORM = "Linux/UNIX"  # the DLAMI the stacks launch (PurchaseCapacityBlock's InstancePlatform)
# The supervisor launches only into blocks tagged so (its IAM condition; blocks.MANAGED_TAG): `capacity buy` tags them.
BLOCK_TAGS = [{"ResourceType": "capacity-reservation", "Tags": [{"Key": naming.TAG_MANAGED, "Value": "true"}]}]


@dataclass(frozen=True)
class Offering:
    """One DescribeCapacityBlockOfferings answer."""

    offering_id: str
    instance_type: str
    zone: str
    count: int
    start: datetime | None
    end: datetime | None
    hours: int
    fee_usd: float | None
    currency: str

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Offering:
        try:
            fee = float(raw.get("UpfrontFee", ""))
        except ValueError:
            fee = None
        return cls(
            raw.get("CapacityBlockOfferingId", ""), raw.get("InstanceType", ""), raw.get("AvailabilityZone", ""),
            int(raw.get("InstanceCount", 0)), _moment(raw.get("StartDate")), _moment(raw.get("EndDate")),
            int(raw.get("CapacityBlockDurationHours", 0)), fee, raw.get("CurrencyCode", "USD"),
        )  # fmt: skip

    def price(self) -> str:
        return "unknown" if self.fee_usd is None else f"{self.fee_usd:,.2f} {self.currency}"

    def row(self) -> dict[str, Any]:
        from training_infra.supervisor.runtime.records import iso

        return {
            "offering_id": self.offering_id, "instance_type": self.instance_type, "zone": self.zone,
            "count": self.count, "start": iso(self.start) if self.start else None,
            "end": iso(self.end) if self.end else None, "hours": self.hours, "upfront_fee": self.fee_usd,
            "currency": self.currency,
        }  # fmt: skip


def _console() -> Any:
    from rich.console import Console  # imported by the verbs that print, not at start-up

    return Console(highlight=False, soft_wrap=True)


def _moment(value: Any) -> datetime | None:
    from training_infra.supervisor.runtime.records import parse_iso

    if isinstance(value, datetime):
        return value
    return parse_iso(value) if isinstance(value, str) else None


def _whole(option: str, value: str, least: int, most: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = least - 1
    if not least <= number <= most:
        raise UsageError(f"option '{option}': got {value!r}; allowed: a whole number from {least} to {most}")
    return number


def offerings(ec2: Any, instance_type: str, count: int, hours: int) -> list[Offering]:
    """Every offering EC2 has for this type, count and length, soonest first."""
    from botocore.exceptions import ClientError  # botocore only when a verb calls AWS: --help stays fast

    kwargs: dict[str, Any] = {"InstanceType": instance_type, "InstanceCount": count, "CapacityDurationHours": hours}
    found: list[Offering] = []
    while True:
        try:
            page = ec2.describe_capacity_block_offerings(**kwargs)
        except ClientError as error:
            details = error.response.get("Error", {})
            raise CliError(
                f"EC2 refused to list Capacity Block offerings for {count} x {instance_type} for {hours} h: "
                f"{details.get('Code', 'error')}: {details.get('Message', '')}".rstrip(": ")
            ) from None
        found += [Offering.of(raw) for raw in page.get("CapacityBlockOfferings", [])]
        if not page.get("NextToken"):
            break
        kwargs["NextToken"] = page["NextToken"]
    return sorted(found, key=lambda o: (o.start or datetime.max.replace(tzinfo=UTC), o.fee_usd or 0.0))


@capacity_app.command("offers")
@reported_errors
def offers(
    instance_type: TypeOption,
    hours: HoursOption,
    count: CountOption = "1",
    output: Annotated[str, typer.Option("--output", "-o", metavar="table|json", help="table or json.")] = "table",
    region: Region = None,
) -> None:
    """List the Capacity Block offerings for TYPE x COUNT for HOURS: start, end, zone, upfront price."""
    from training_infra.supervisor.runtime.records import iso

    fmt = output_format(output)
    wanted = _whole("--count", count, 1, 64), _whole("--hours", hours, 1, 24 * 182)
    found = offerings(Aws(region).client("ec2"), instance_type, *wanted)
    if fmt == "json":
        print_json([o.row() for o in found])
        return
    out = _console()
    if not found:
        out.print(f"no Capacity Block offering for {wanted[0]} x {instance_type} for {wanted[1]} h", markup=False)
        return
    listing = Listing(
        title=f"Capacity Block offerings: {wanted[0]} x {instance_type} for {wanted[1]} h",
        columns=[Column(name, right=name == "price") for name in ("offering", "zone", "start", "end", "price")],
        caption="price: paid upfront at purchase; `training-infra capacity buy OFFERING --yes` buys one",
    )
    for o in found:
        listing.rows.append([o.offering_id, o.zone, iso(o.start) if o.start else "-", iso(o.end) if o.end else "-",
                             o.price()])  # fmt: skip
    listing.print(out)


@capacity_app.command("buy")
@reported_errors
def buy(
    offering_id: Annotated[str, typer.Argument(metavar="OFFERING", help="An offering id from `capacity offers`.")],
    instance_type: TypeOption,
    hours: HoursOption,
    count: CountOption = "1",
    yes: Annotated[bool, typer.Option("--yes", help="Buy it: the upfront fee is charged at once.")] = False,
    region: Region = None,
) -> None:
    """Buy one Capacity Block offering (the same --type, --count and --hours that listed it).

    Refused without --yes, and when its upfront fee is more than the month has left of monthly_limit_usd.
    """
    wanted = _whole("--count", count, 1, 64), _whole("--hours", hours, 1, 24 * 182)
    aws = Aws(region)
    line = purchase(aws.client("ec2"), offering_id, instance_type, *wanted, yes=yes, fees=_month_fees(aws))
    _console().print(line, markup=False)


@dataclass(frozen=True)
class MonthFees:
    """Where a purchase is charged: the month's ledger item (ledger.BlockFees) and the month's key."""

    fees: Any  # ledger.BlockFees
    month: str

    @property
    def limit_usd(self) -> float:
        return float(self.fees.ledger.limit_usd)


def purchase(
    ec2: Any, offering_id: str, instance_type: str, count: int, hours: int, *, yes: bool, fees: MonthFees | None,
) -> str:  # fmt: skip
    """Buy the offering if it is still offered, --yes was given and the month's limit has room; the line to print.

    The fee is charged in the month's ledger (the limit check and the charge in one conditional write) before EC2
    is asked, and taken back if EC2 refuses: two purchases against one remainder cannot both pass. A purchase of
    the same offering interrupted earlier (its entry still `buying`) is settled first (settle_interrupted)."""
    settled = ""
    if fees is not None:
        pending = fees.fees.entry(fees.month, offering_id)
        if pending is not None and pending.get("state") == "buying":
            settled = settle_interrupted(ec2, fees, offering_id, pending)
            if settled.startswith("Capacity Block "):
                return settled
    matching = [o for o in offerings(ec2, instance_type, count, hours) if o.offering_id == offering_id]
    if not matching:
        raise CliError(
            f"offering {offering_id}: not among EC2's offerings for {count} x {instance_type} for {hours} h "
            "now (they change): list them again with `training-infra capacity offers`"
        )
    from training_infra.supervisor.runtime.records import OverLimit, StaleRecord, iso, utc_now

    offer = matching[0]
    what = (f"{offer.count} x {offer.instance_type} in {offer.zone} from "
            f"{iso(offer.start) if offer.start else '?'} to {iso(offer.end) if offer.end else '?'}")  # fmt: skip
    refused = f"refused: Capacity Block {offering_id} ({what}) costs {offer.price()} upfront"
    refusal = buy_refusal(offer, yes, fees.limit_usd if fees else 0.0)
    if refusal:
        raise CliError(f"{refused}: {refusal}")
    from botocore.exceptions import BotoCoreError, ClientError

    if fees is not None:
        try:
            block = {
                "instance_type": offer.instance_type,
                "zone": offer.zone,
                "count": offer.count,
                "start": iso(offer.start) if offer.start else "",
                "end": iso(offer.end) if offer.end else "",
            }
            fees.fees.charge(fees.month, offering_id, offer.fee_usd or 0.0, what, iso(utc_now()), block)
        except (OverLimit, StaleRecord) as error:
            raise CliError(f"{refused}: {error}") from None
        except (ClientError, BotoCoreError) as error:  # not charged, so not bought: the limit holds
            raise CliError(
                f"{refused}: the month's ledger could not be charged ({describe(error)}); nothing bought (the buyer "
                "needs dynamodb:GetItem and PutItem on the run table)"
            ) from None
    try:
        answer = ec2.purchase_capacity_block(
            CapacityBlockOfferingId=offering_id, InstancePlatform=INSTANCE_PLATFORM, TagSpecifications=BLOCK_TAGS
        )
    except ClientError as error:
        if fees is not None:
            fees.fees.refund(fees.month, offering_id)
        details = error.response.get("Error", {})
        raise CliError(f"EC2 refused to sell Capacity Block {offering_id}: {details.get('Code', 'error')}: "
                       f"{details.get('Message', '')}".rstrip(": ")) from None  # fmt: skip
    reservation = answer.get("CapacityReservation", {}).get("CapacityReservationId", "?")
    if fees is not None:
        fees.fees.bought(fees.month, offering_id, reservation)
    return (
        settled
        + f"bought Capacity Block {reservation}: {what}, {offer.price()}"
        + (f" (counted in {fees.month.removeprefix('#month-')}'s spend)" if fees is not None else "")
    )


# EC2 answers PurchaseCapacityBlock in seconds: an entry still `buying` this long after its charge, with no block
# EC2 lists for it, is a purchase that never reached EC2 or that EC2 refused while the buyer was gone.
SETTLE_AFTER = timedelta(minutes=10)


def settle_interrupted(ec2: Any, fees: MonthFees, offering_id: str, entry: dict[str, Any]) -> str:
    """An earlier `capacity buy` of this offering stopped between the ledger's charge and EC2's answer (a timeout,
    Ctrl-C). PurchaseCapacityBlock has no client token, so the block is looked for: a managed Capacity Block of the
    offering's type, zone, count, start and end that no other entry names. Found: the entry is settled `bought` and
    that line is returned (nothing is bought again). None, SETTLE_AFTER after the charge: the charge is taken back and
    "" (or a note) lets the purchase go on. None sooner: refused in one line (the purchase may still be under way)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from training_infra.supervisor.runtime.records import iso, parse_iso, utc_now

    block, at = entry.get("block") or {}, parse_iso(entry.get("at")) or utc_now()
    taken = {str(e.get("reservation")) for e in fees.fees.listed(fees.month) if e.get("reservation")}
    try:
        found = _managed_blocks(ec2, str(block.get("instance_type", "")))
    except (ClientError, BotoCoreError) as error:
        raise CliError(f"refused: offering {offering_id} is already charged ({entry.get('what', '')}, `buying` since "
                       f"{iso(at)}) and its block could not be looked for ({describe(error)}); nothing bought "
                       "(the buyer needs ec2:DescribeCapacityReservations): try again") from None  # fmt: skip
    for reservation in found:
        if (reservation.get("CapacityReservationId") not in taken and block
                and reservation.get("AvailabilityZone") == block.get("zone")
                and int(reservation.get("TotalInstanceCount", 0)) == int(block.get("count", 0))
                and _same_moment(reservation.get("StartDate"), block.get("start"))
                and _same_moment(reservation.get("EndDate"), block.get("end"))):  # fmt: skip
            reservation_id = reservation["CapacityReservationId"]
            fees.fees.bought(fees.month, offering_id, reservation_id)
            return (f"Capacity Block {reservation_id} was bought from offering {offering_id} by an interrupted "
                    f"`capacity buy` ({entry.get('what', '')}): now recorded as bought in the month's ledger; "
                    "nothing bought again")  # fmt: skip
    if utc_now() - at < SETTLE_AFTER:
        raise CliError(f"refused: a purchase of offering {offering_id} began {iso(at)} ({entry.get('what', '')}, "
                       "charged, `buying`) and EC2 lists no Capacity Block from it yet: if that purchase still runs, "
                       f"wait for it; otherwise run the same command again after {iso(at + SETTLE_AFTER)} (its "
                       "charge is then taken back and the offering bought)")  # fmt: skip
    fees.fees.refund(fees.month, offering_id)
    return (f"note: the purchase of offering {offering_id} begun {iso(at)} made no Capacity Block: its charge was "
            "taken back. ")  # fmt: skip


def _managed_blocks(ec2: Any, instance_type: str) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{naming.TAG_MANAGED}", "Values": ["true"]}]
    if instance_type:
        filters.append({"Name": "instance-type", "Values": [instance_type]})
    found, token = [], None
    while True:
        page = ec2.describe_capacity_reservations(Filters=filters, **({"NextToken": token} if token else {}))
        found += [r for r in page.get("CapacityReservations", []) if r.get("ReservationType") == "capacity-block"]
        token = page.get("NextToken")
        if not token:
            return found


def _same_moment(value: Any, iso_text: Any) -> bool:
    moment, wanted = _moment(value), _moment(iso_text)
    return moment is not None and wanted is not None and abs((moment - wanted).total_seconds()) < 1


def describe(error: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", "error"))
    return type(error).__name__


def buy_refusal(offer: Offering, yes: bool, limit_usd: float) -> str:
    """Why a purchase is refused before the ledger is asked, or "": buying is a deliberate act, and a fee that cannot
    be read cannot be held to the month's limit."""
    if limit_usd and offer.fee_usd is None:
        return f"its fee cannot be read, so monthly_limit_usd {limit_usd:g} cannot hold it"
    if not yes:
        return "pass --yes to buy it (not refundable)"
    return ""


def _month_fees(aws: Aws) -> MonthFees | None:
    """The month's ledger to charge (monthly_limit_usd from the compute stack's output, the run table from the
    storage stack's); None without a run table (a deployment from before it: nothing to charge)."""
    from training_infra.supervisor.runtime.ledger import BlockFees
    from training_infra.supervisor.runtime.records import MonthlyLedger

    try:
        limit = float(aws.stack_outputs(naming.COMPUTE_STACK).get(naming.OUTPUT_MONTHLY_LIMIT_USD) or 0)
    except ValueError:
        limit = 0.0
    table = aws.stack_outputs(naming.STORAGE_STACK).get(naming.OUTPUT_RUN_TABLE, "")
    if not table:
        if limit:
            raise CliError(f"monthly_limit_usd {limit:g} is set but the storage stack has no run table output: the "
                           "fee cannot be held to it; nothing bought")  # fmt: skip
        return None
    ledger = MonthlyLedger(aws.client("dynamodb"), table, limit)
    return MonthFees(BlockFees(ledger), MonthlyLedger.key(datetime.now(UTC)))
