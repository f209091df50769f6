"""`training-infra status`: what is running, what ran, and one run in detail."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from training_infra.cli.aws import Aws
from training_infra.cli.errors import reported_errors
from training_infra.cli.options import JsonFlag, Region, check_run_id, whole_number
from training_infra.cli.render import (
    STATUS_FORMATS,
    Column,
    Listing,
    fmt_duration,
    fmt_usd,
    hhmm,
    output_format,
    print_columns,
    print_json,
    stdout,
)
from training_infra.cli.safe_text import remote_text


@reported_errors
def status(
    run: Annotated[str | None, typer.Argument(metavar="RUN", help="Only this run.", show_default=False)] = None,
    limit: Annotated[
        str, typer.Option("--limit", "-n", metavar="N", help="Show at most this many runs, newest first.")
    ] = "20",
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            metavar="table|wide|json",
            help="table: one line per run; wide: also instance, type, market and deadline; json: for scripts.",
        ),
    ] = "table",
    as_json: JsonFlag = False,
    group: Annotated[
        str | None, typer.Option("--group", "-g", metavar="GROUP", help="A sweep's trials and its best so far.")
    ] = None,
    region: Region = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="With RUN: why it waits (pools tried, EC2's answers, cooldowns).")
    ] = False,
) -> None:
    """Show runs: instance, type, market, state, uptime, deadline, cost so far, outcome.

    The newest runs come from the run table (one query, however many runs the team has made);
    EC2 and prices are asked only for the runs shown that are still going. Runs known only from
    their status.json (made before the run table) are recorded in it the first time they are seen.
    """
    from training_infra.cli.source import RunSource

    fmt = output_format(output, as_json=as_json, allowed=STATUS_FORMATS)
    if group is not None:  # a sweep (cli/commands/sweep.py)
        from training_infra.cli.commands.sweep import show_group

        show_group(Aws(region), group, fmt)
        return
    count = whole_number("--limit", limit)
    if run is not None:
        run = check_run_id(run)
    aws = Aws(region)
    source = RunSource(aws)
    if run is not None:
        rows, record = source.run_rows(run, count)
        from training_infra.cli import capacity, runs

        if record is not None and verbose:
            rows[0]["waiting"] = capacity.waiting(record, runs.utcnow())
        if record is not None and fmt != "json":
            _show_managed_run(rows[0])
            for line in capacity.waiting_lines(rows[0].get("waiting")):
                stdout().print(remote_text(line), markup=False)  # pool names and EC2's words come from the record
            return
    else:
        rows = source.newest_rows(count)
    if fmt == "json":
        print_json(rows)
        return
    if not rows:
        stdout().print(f"no runs yet in {aws.region_name}: start one with `training-infra launch`", markup=False)
        return
    wide = fmt == "wide"
    headers = ["RUN", "STATE", "TRIES", *(["INSTANCE", "TYPE", "MARKET"] if wide else []), "UPTIME"]
    headers += [*(["DEADLINE"] if wide else []), "COST", "OUTCOME"]
    lines = []
    for row in rows:
        outcome = row["outcome"] or ""
        if row["exit_code"] not in (None, "") and outcome:
            outcome += f" (exit {row['exit_code']})"
        line = [row["run_id"], row["state"], str(row.get("tries") or "-")]
        if wide:
            line += [row["instance_id"] or "-", row["instance_type"] or "-", row["market"] or "-"]
        line.append(fmt_duration(row["uptime_seconds"]))
        if wide:
            line.append(row["deadline"] or "-")
        lines.append([*line, fmt_usd(row["cost_usd"]), outcome or "-"])
    print_columns(headers, lines, right=("TRIES", "UPTIME", "COST"))


def _progress_words(progress: dict[str, Any] | None) -> str:
    """`step 1200, 3.1 steps/s, last progress 40 s ago`, or why there is none."""
    from training_infra.cli import runs

    if not progress:
        return "none reported yet this attempt (a trainer that never writes HEARTBEAT_FILE is judged by idle GPU only)"
    parts = []
    step = progress.get("step")
    if isinstance(step, (int, float)):
        parts.append(f"step {int(step)}" if float(step).is_integer() else f"step {step}")
    if isinstance(progress.get("steps_per_second"), (int, float)):
        parts.append(f"{progress['steps_per_second']:.3g} steps/s")
    changed = runs.parse_time(progress.get("changed_at"))
    if changed is not None:
        ago = max(0.0, (runs.utcnow() - changed).total_seconds())
        parts.append(f"last progress {fmt_duration(ago) if ago >= 120 else f'{ago:.0f} s'} ago")
    return ", ".join(parts) or "beats without a step"


def cold_start_words(cold: dict[str, Any] | None) -> str:
    """`9.8 s (image 9.8 s, data 6.7 s, checkpoints 7.5 s; slowest image)`: the last attempt's image pull,
    data and checkpoint restore, which run at once (issue 29), or why there is no figure."""
    if not cold or not isinstance(cold.get("parts"), dict):
        return "not reported yet this attempt (the agent writes it when its image, data and checkpoints are in)"
    parts = [f"{name} {seconds:.1f} s" for name, seconds in cold["parts"].items() if isinstance(seconds, (int, float))]
    total = cold.get("total_seconds")
    head = f"{total:.1f} s" if isinstance(total, (int, float)) else "?"
    tail = f"{cold['failed']} failed" if cold.get("failed") else f"slowest {cold.get('slowest')}"
    return f"{head} ({', '.join(parts)}; {tail})"


def _show_managed_run(row: dict[str, Any]) -> None:
    out = stdout()
    spec = row["managed"]["spec"]
    # Short lines: readable at 80 columns and piped; a long message stays one line for grep.
    for line in (
        f"run {row['run_id']}: {row['state']}",
        f"  {row['message']}",
        f"  deadline {row['deadline']}",
        f"  market {spec.get('market')}; types {', '.join(spec.get('instance_types', []))}",
        f"  restarts on errors: {row['managed']['errors_used']} of {spec.get('max_restarts_on_errors', 0)} used",
        f"  uptime {fmt_duration(row['uptime_seconds'])}; cost {fmt_usd(row['cost_usd'])}"
        + (f" of {fmt_usd(row['max_cost_usd'])} ({fmt_usd(row['left_usd'])} left)" if row["max_cost_usd"] else ""),
        f"  progress: {_progress_words(row.get('progress'))}",
        f"  cold start: {cold_start_words(row.get('cold_start'))}",
        *(["  data: mounted read-only at /data (data_access=mount, Mountpoint for Amazon S3)"]
          if row["managed"].get("data_access") == "mount" else []),
    ):  # fmt: skip
        out.print(remote_text(line), markup=False)  # the message and spec come from the run record
    listing = Listing(
        title=f"attempts of {row['run_id']}",
        columns=[
            Column(name, right=name in ("#", "uptime", "cost"))
            for name in (
                "#",
                "instance",
                "type",
                "zone",
                "market",
                "state",
                "start",
                "end",
                "uptime",
                "cost",
                "why it ended",
            )
        ],
        caption="cost: spot history (else list price) + volume",
    )
    for a in row["attempts"]:
        why = a["end_reason"] or ("-" if a["instance_id"] else "launching")
        if a["end_reason"] == "capacity" and a["tries"] > 1:
            why += f" ({a['tries']} tries)"
        if a["message"] and a["end_reason"] not in (None, "succeeded"):
            why += f": {a['message']}"
        listing.rows.append([
            str(a["attempt"]), a["instance_id"] or "-", a["instance_type"] or "-", a["zone"] or "-", a["market"] or "-",
            a["instance_state"] or "-", hhmm(a["started_at"]), hhmm(a["ended_at"]), fmt_duration(a["uptime_seconds"]),
            fmt_usd(a["cost_usd"]), why,
        ])  # fmt: skip
    listing.print(out)
    gang = next((a for a in reversed(row["attempts"]) if a.get("nodes")), None)
    if gang is not None:  # a multi-node run: its newest gang, node by node
        nodes = Listing(
            title=f"nodes of attempt {gang['attempt']}",
            columns=[Column(name) for name in ("rank", "instance", "type", "zone", "address", "state", "why it ended")],
            caption="rank 0 hosts the torchrun rendezvous; a replaced node is listed with its replacement",
        )
        for node in gang["nodes"]:
            why = node["end_reason"] or "-"
            if node["message"] and node["end_reason"]:
                why += f": {node['message']}"
            nodes.rows.append([
                str(node["node"]), node["instance_id"], node["instance_type"] or "-", node["zone"] or "-",
                node["private_ip"] or "-", node["state"] or "-", why,
            ])  # fmt: skip
        nodes.print(out)
