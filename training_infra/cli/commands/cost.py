"""`training-infra cost`: what runs cost in a period, and the saving against on-demand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from training_infra.cli.aws import Aws
from training_infra.cli.errors import UsageError, reported_errors
from training_infra.cli.options import JsonFlag, Output, Region, whole_number
from training_infra.cli.render import Column, Listing, fmt_usd, output_format, print_columns, print_json, stdout


@reported_errors
def cost(
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            metavar="DATE",
            help="Start of the period: YYYY-MM-DD or YYYY-MM (UTC). Default: the 1st of this month.",
            show_default=False,
        ),
    ] = None,
    days: Annotated[
        str | None,
        typer.Option("--days", "-d", metavar="N", help="The last N days instead of --since.", show_default=False),
    ] = None,
    run: Annotated[
        str | None, typer.Option("--run", metavar="RUN", help="Only this run, per attempt.", show_default=False)
    ] = None,
    month: Annotated[
        bool,
        typer.Option(
            "--month",
            help="This month's standing under monthly_limit_usd instead: spent, reserved by active runs, left.",
        ),
    ] = False,
    output: Output = "table",
    as_json: JsonFlag = False,
    region: Region = None,
) -> None:
    """Cost per run in a period, in total, and the saving against on-demand prices.

    Read from what the run table records per attempt (the supervisor prices each attempt when it
    ends); only attempts still going are priced now, with one spot price history per type and
    zone. An attempt that began before the period counts for the hours inside it. `--month`:
    the month's ledger the supervisor keeps against monthly_limit_usd.
    """
    from training_infra.cli import launching, runs
    from training_infra.cli.source import RunSource

    if month:
        if since is not None or days is not None or run is not None:
            raise UsageError("option '--month': got it with --since, --days or --run; allowed: --month alone")
        _month_standing(Aws(region), output_format(output, as_json=as_json), runs.utcnow())
        return

    fmt = output_format(output, as_json=as_json)
    now = runs.utcnow()
    # One run: its whole life unless a period is given.
    whole_run = run is not None and since is None and days is None
    start, period = (datetime(1970, 1, 1, tzinfo=UTC), "over its whole run") if whole_run else _period(since, days, now)
    if run is not None:
        run = launching.check("run_id", "--run", run)
        if not run:
            raise UsageError("option '--run': got ''; allowed: a run id such as 20261128-160000-ab12")
    aws = Aws(region)
    rows, attempts = RunSource(aws).cost_rows(run, start, now)
    total = sum(r["cost_usd"] or 0 for r in rows)
    on_demand = sum(r["on_demand_usd"] if r["on_demand_usd"] is not None else (r["cost_usd"] or 0) for r in rows)
    saving = on_demand - total
    if fmt == "json":
        print_json(
            {
                "since": runs.iso_z(start),
                "until": runs.iso_z(now),
                "runs": [{**row, "attempts": attempts.get(row["run_id"], [])} for row in rows],
                "total_usd": total,
                "on_demand_usd": on_demand,
                "saving_usd": saving,
            }
        )
        return
    if not rows:
        stdout().print(f"no runs {period} in {aws.region_name}", markup=False)
        return
    out = stdout()
    if run is not None and attempts.get(run):
        _cost_attempts_listing(run, period, attempts[run]).print(out)
    else:
        listing = Listing(
            title=f"cost of runs {period} ({aws.region_name})",
            columns=[
                Column(name, right=name in ("tries", "hours", "cost", "on-demand"))
                for name in ("run", "type", "market", "tries", "hours", "cost", "on-demand", "price from")
            ],
            footer=["total", "", "", "", "", fmt_usd(total), fmt_usd(on_demand), ""],
        )
        for row in rows:
            hours = row["uptime_seconds"] / 3600 if row["uptime_seconds"] is not None else None
            listing.rows.append([
                row["run_id"], row["instance_type"] or "-", row["market"] or "-", str(row.get("tries") or "-"),
                f"{hours:.2f}" if hours is not None else "-",
                fmt_usd(row["cost_usd"]), fmt_usd(row["on_demand_usd"]), row["price_source"] or "-",
            ])  # fmt: skip
        listing.print(out)
    percent = f" ({saving / on_demand:.0%})" if on_demand > 0 else ""
    out.print(f"saving vs on-demand: {fmt_usd(saving)}{percent}", markup=False)


def _period(since: str | None, days: str | None, now: datetime) -> tuple[datetime, str]:
    """The period's start and its words: --since DATE, --days N, or this month."""
    if since is not None and days is not None:
        raise UsageError("options '--since' and '--days': got both; allowed: one of them")
    if days is not None:
        count = whole_number("--days", days)
        return now - timedelta(days=count), f"in the last {count} days"
    if since is None:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return start, f"since {start:%Y-%m-%d}"
    for pattern in ("%Y-%m-%d", "%Y-%m"):
        try:
            start = datetime.strptime(since, pattern).replace(tzinfo=UTC)
        except ValueError:
            continue
        if start > now:
            raise UsageError(f"option '--since': got {since!r}; allowed: a date not in the future")
        return start, f"since {start:%Y-%m-%d}"
    raise UsageError(f"option '--since': got {since!r}; allowed: a date as YYYY-MM-DD or YYYY-MM")


def _cost_attempts_listing(run: str, period: str, attempts: list[dict[str, Any]]) -> Listing:
    listing = Listing(
        title=f"cost of run {run} {period}",
        columns=[
            Column(name, right=name in ("#", "hours", "$/hour", "cost", "on-demand"))
            for name in ("#", "type", "zone", "market", "hours", "$/hour", "cost", "on-demand", "price from")
        ],
        footer=[
            "total",
            "",
            "",
            "",
            "",
            "",
            fmt_usd(sum(a["cost_usd"] or 0 for a in attempts)),
            fmt_usd(sum(a["on_demand_usd"] or 0 for a in attempts)),
            "",
        ],  # fmt: skip
    )
    for a in attempts:
        listing.rows.append([
            str(a["attempt"]), a["instance_type"] or "-", a["zone"] or "-", a["market"] or "-",
            f"{a['uptime_seconds'] / 3600:.2f}", f"{a['hourly_usd']:.4f}" if a["hourly_usd"] else "-",
            fmt_usd(a["cost_usd"]), fmt_usd(a["on_demand_usd"]), a["price_source"],
        ])  # fmt: skip
    return listing


def _month_standing(aws: Aws, fmt: str, now: datetime) -> None:
    """Spent by finished runs, reserved by active ones, and left under monthly_limit_usd (the supervisor's ledger)."""
    from training_infra.cli import launching
    from training_infra.cli.source import RunSource
    from training_infra.supervisor.runtime.records import MonthlyLedger

    limit = launching._monthly_limit(aws)
    store = RunSource(aws).store
    key = MonthlyLedger.key(now)
    blocks = _month_blocks(aws, store.table, key) if store is not None else []
    if store is None or limit <= 0:
        if fmt == "json":
            print_json(
                {"month": f"{now:%Y-%m}", "limit_usd": 0, "spent_usd": None, "reserved_usd": None, "left_usd": None,
                 "capacity_blocks": blocks}
            )  # fmt: skip
            return
        stdout().print(
            f"monthly_limit_usd is 0 in {aws.region_name} (no monthly limit): the month is not reserved against; "
            "`training-infra cost` shows what runs cost",
            markup=False,
        )
        _print_blocks(blocks)
        return
    spent, reserved, left = MonthlyLedger(aws.client("dynamodb"), store.table, limit).left(key)
    if fmt == "json":
        print_json(
            {
                "month": f"{now:%Y-%m}",
                "limit_usd": limit,
                "spent_usd": spent,
                "reserved_usd": reserved,
                "left_usd": left,
                "capacity_blocks": blocks,
            }
        )
        return
    print_columns(
        ["MONTH", "LIMIT", "SPENT", "RESERVED", "LEFT"],
        [[f"{now:%Y-%m}", fmt_usd(limit), fmt_usd(spent), fmt_usd(reserved), fmt_usd(max(0.0, left))]],
        right=("LIMIT", "SPENT", "RESERVED", "LEFT"),
    )
    _print_blocks(blocks)
    stdout().print(
        f"spent: finished runs and Capacity Block fees; reserved: the most each active run may still cost; left: what "
        f"a new launch may "
        f"reserve ({aws.region_name})",
        markup=False,
    )


def _month_blocks(aws: Aws, table: str, key: str) -> list[dict[str, Any]]:
    """The month's Capacity Block purchases from its ledger item (`capacity buy` charges them there)."""
    from training_infra.supervisor.runtime.ledger import BlockFees
    from training_infra.supervisor.runtime.records import MonthlyLedger

    return BlockFees(MonthlyLedger(aws.client("dynamodb"), table, 0.0)).listed(key)


def _print_blocks(blocks: list[dict[str, Any]]) -> None:
    for block in blocks:
        name = block.get("reservation") or block["offering_id"]
        bought = block.get("state") == "bought"
        state = "bought" if bought else "being bought (or its buyer stopped before EC2 answered)"
        stdout().print(
            f"capacity block {name}: {fmt_usd(float(block.get('fee_usd') or 0))} upfront, {state} "
            f"{block.get('at', '')} ({block.get('what', '')}); in spent",
            markup=False,
        )
