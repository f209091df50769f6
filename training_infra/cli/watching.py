"""What `training-infra watch` draws: a run's history over time, from the run record and the agent's metrics.

The agent appends one line per heartbeat change to `metrics.jsonl` in each attempt's logs folder
(ti_agent/metrics.py); the run record gives each attempt's start, end and why it ended, and the
ledger (through RunSource's rows) each attempt's cost. The time axis is minutes since the run's
first attempt started; each attempt's start and each spot reclaim is a vertical mark on every chart.
The terminal view is drawn with plotext, the picture (`--png`) with matplotlib, imported only then.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from training_infra import naming
from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError
from training_infra.cli.safe_text import remote_text

PREEMPTED = ("reclaimed", "interrupted")  # a spot reclaim; `interrupted` on runs imported from a status.json
PREEMPTION = "preempted"  # a mark's label
PREEMPTION_MARKER = "x"  # its character on the terminal charts; an attempt's start is a block line (▐)
MAX_METRIC_CHARTS = 3  # loss, accuracy and one more fit 80x50; the rest are in metrics.jsonl
FIXED = ("t", "step", "steps_per_second", "gpu_percent")


@dataclass(frozen=True)
class Point:
    minutes: float
    step: float | None
    steps_per_second: float | None
    gpu_percent: float | None
    values: dict[str, float]


@dataclass(frozen=True)
class Mark:
    minutes: float
    label: str  # "attempt 2" or "preempted"


@dataclass
class RunView:
    run_id: str
    state: str
    active: bool
    limit_usd: float | None
    spent_usd: float | None
    points: list[Point] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    spend: list[tuple[float, float]] = field(default_factory=list)  # (minutes, USD so far)

    def metric_names(self) -> list[str]:
        names: dict[str, None] = {}
        for point in self.points:
            names.update(dict.fromkeys(point.values))
        return list(names)

    def summary(self) -> str:
        last = self.points[-1] if self.points else None
        parts = [f"run {self.run_id}: {self.state}"]
        if last is not None and last.step is not None:
            parts.append(f"step {last.step:g}")
        if last is not None and last.steps_per_second is not None:
            parts.append(f"{last.steps_per_second:.3g} steps/s")
        if self.spent_usd is not None:
            limit = f" of ${self.limit_usd:,.2f}" if self.limit_usd else ""
            parts.append(f"${self.spent_usd:,.2f}{limit}")
        preempted = sum(1 for mark in self.marks if mark.label == PREEMPTION)
        if preempted:
            parts.append(f"{preempted} preemption(s)")
        return ", ".join(parts)


def _minutes(moment: datetime | None, start: datetime) -> float | None:
    return (moment - start).total_seconds() / 60 if moment is not None else None


def parse_metrics(text: str, start: datetime) -> list[Point]:
    """metrics.jsonl as points; a line that is not the agent's (cut by a crash, edited) is skipped."""
    from training_infra.cli import runs

    points = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if not isinstance(item, dict):
            continue
        minutes = _minutes(runs.parse_time(item.get("t")), start)
        if minutes is None:
            continue

        def number(value: Any) -> float | None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            return float(value) if ok else None

        # The agent keeps only safe names (ti_agent/metrics.py), but the file sits in S3 where the
        # instance writes: every name is cleaned again before it becomes a chart title.
        values = {
            name: float(v)
            for k, v in item.items()
            if k not in FIXED and number(v) is not None and (name := remote_text(k).strip())
        }
        points.append(
            Point(
                minutes, number(item.get("step")), number(item.get("steps_per_second")),
                number(item.get("gpu_percent")), values,
            )
        )  # fmt: skip
    return points


def load(aws: Aws, run: str) -> RunView:
    """The run's view now: one record read, one metrics.jsonl per launched attempt, EC2 only for the open one."""
    import botocore.exceptions

    from training_infra.cli import runs
    from training_infra.cli.source import RunSource, managed_rows

    record = RunSource(aws).record(run)
    if record is None:
        runs.require_runs(aws, run)  # unknown run: the usual one line
        raise CliError(f"run {run} has no run record (made before the run table): `watch` needs a managed run")
    [row] = managed_rows(aws, [record])
    attempts = [a for a in row["attempts"] if a["instance_id"]]
    starts = [runs.parse_time(a["started_at"]) for a in attempts]
    start = next((moment for moment in starts if moment is not None), None) or runs.parse_time(record.created_at)
    view = RunView(
        run_id=run, state=remote_text(row["state"]), active=record.active, limit_usd=row.get("max_cost_usd"),
        spent_usd=row["cost_usd"],
    )  # fmt: skip
    bucket = aws.output(naming.OUTPUT_OUTPUTS_BUCKET)
    spent = 0.0
    for attempt, began in zip(attempts, starts, strict=True):
        began_minutes = _minutes(began, start)
        if began_minutes is None:
            continue
        view.marks.append(Mark(began_minutes, f"attempt {attempt['attempt']}"))
        ended_minutes = began_minutes + (attempt["uptime_seconds"] or 0) / 60
        view.spend += [(began_minutes, spent), (ended_minutes, spent + (attempt["cost_usd"] or 0))]
        spent += attempt["cost_usd"] or 0
        if attempt["end_reason"] in PREEMPTED:
            # When the record says the attempt ended; the billed window (uptime) can run on while the
            # reclaimed instance shuts down, which put the mark minutes late on a real run.
            ended = _minutes(runs.parse_time(attempt["ended_at"]), start)
            view.marks.append(Mark(ended if ended is not None else ended_minutes, PREEMPTION))
        key = f"{naming.RUNS_PREFIX}{run}/attempts/{attempt['attempt']}/logs/metrics.jsonl"
        try:
            body = aws.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                continue  # no beat yet, or a trainer that never beats
            raise
        view.points += parse_metrics(body.decode("utf-8", "replace"), start)
    view.points.sort(key=lambda point: point.minutes)
    return view


def charts(view: RunView) -> list[tuple[str, list[tuple[float, float]], float | None]]:
    """(title, points, a horizontal line such as the limit) per chart, only the charts with data."""
    found = []

    def series(get: Any) -> list[tuple[float, float]]:
        return [(p.minutes, value) for p in view.points if (value := get(p)) is not None]

    found.append(("step", series(lambda p: p.step), None))
    for name in view.metric_names()[:MAX_METRIC_CHARTS]:
        found.append((name, series(lambda p, name=name: p.values.get(name)), None))
    found.append(("steps per second", series(lambda p: p.steps_per_second), None))
    found.append(("GPU use, %", series(lambda p: p.gpu_percent), None))
    limit = f" (limit ${view.limit_usd:,.2f})" if view.limit_usd else ""
    found.append((f"USD spent{limit}", view.spend, view.limit_usd or None))
    return [chart for chart in found if chart[1]]


def draw_text(view: RunView, width: int = 80, chart_height: int = 9) -> str:
    """The terminal view: a summary line, one chart per series, the marks listed under them. No colour."""
    import plotext

    found = charts(view)
    lines = textwrap.wrap(view.summary(), width=width)
    if not found:
        return "\n".join([*lines, "no history yet: the agent writes it once the trainer beats (HEARTBEAT_FILE)"]) + "\n"
    figure = plotext.figure
    for title, points, level in found:  # one figure per chart: each gets its full height at any terminal size
        figure.clear()
        figure.plot_size(width, chart_height)
        figure.theme("colorless")
        xs, ys = [x for x, _ in points], [y for _, y in points]
        low, high = min([*ys, *([level] if level else [])]), max([*ys, *([level] if level else [])])
        figure.draw(figure.signal(xs, ys).lines().label(title))
        if level:
            figure.draw(figure.signal([min(xs), max(xs)], [level, level]).lines().label("limit"))
        for mark in view.marks:  # a vertical segment in data coordinates; a reclaim drawn with its own character
            marker = PREEMPTION_MARKER if mark.label == PREEMPTION else None
            figure.draw(
                figure.signal([mark.minutes, mark.minutes], [low, high], marker=marker).lines().label(mark.label)
            )
        figure.title(title)
        lines.append(figure.build().string(colorless=True).rstrip("\n"))
    span = max([mark.minutes for mark in view.marks] + [x for _, points, _ in found for x, _ in points[-1:]])
    digits = 0 if span >= 10 else 1  # a run of a few minutes: 0.4 min, not 0 min
    marks = ", ".join(f"{mark.label} at {mark.minutes:.{digits}f} min" for mark in view.marks)
    lines += textwrap.wrap(
        f"minutes since the first attempt started; marks (▐ an attempt starts, {PREEMPTION_MARKER} a spot reclaim): "
        f"{marks}",
        width=width,
    )
    return "\n".join(lines) + "\n"


def write_png(view: RunView, path: Path) -> None:
    """The same charts as a picture (matplotlib, imported only for --png)."""
    try:
        import matplotlib
    except ImportError:
        raise CliError(
            "--png needs matplotlib, an optional extra: pip install 'training-infra[png]' (or make setup)"
        ) from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    found = charts(view)
    if not found:
        raise CliError(f"run {view.run_id} has no history yet: nothing to draw")
    figure = build_figure(view, found)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


MARK_STYLES = {  # label in the legend, colour, line style: a reclaim reads apart from a (re)start
    "attempt": ("an attempt starts", "grey", "-"),
    PREEMPTION: ("spot reclaim (preempted)", "orange", ":"),
}


def build_figure(view: RunView, found: list[tuple[str, list[tuple[float, float]], float | None]]) -> Any:
    """The picture's matplotlib figure: a chart per series, the marks and one legend line for them."""
    from matplotlib import pyplot
    from matplotlib.lines import Line2D

    figure, axes = pyplot.subplots(len(found), 1, figsize=(10, 2.4 * len(found)), sharex=True, squeeze=False)
    for axis, (title, points, level) in zip(axes[:, 0], found, strict=True):
        axis.plot([x for x, _ in points], [y for _, y in points], label=title)
        if level:
            axis.axhline(level, color="red", linestyle="--", label="limit")
        for mark in view.marks:
            _, color, style = MARK_STYLES[PREEMPTION if mark.label == PREEMPTION else "attempt"]
            axis.axvline(mark.minutes, color=color, linestyle=style)
        axis.set_title(_plain(title), fontsize=10)
    axes[-1, 0].set_xlabel("minutes since the first attempt started")
    kinds = dict.fromkeys(PREEMPTION if mark.label == PREEMPTION else "attempt" for mark in view.marks)
    if kinds:  # one line under the charts saying which vertical line is which
        handles = [Line2D([], [], color=MARK_STYLES[k][1], linestyle=MARK_STYLES[k][2]) for k in kinds]
        figure.legend(handles, [MARK_STYLES[k][0] for k in kinds], loc="lower center", ncol=len(kinds), fontsize=9)
    figure.suptitle(_plain(view.summary()), fontsize=10)
    figure.tight_layout(rect=(0, 0.03 if kinds else 0, 1, 1))
    return figure


def _plain(text: str) -> str:
    """matplotlib reads `$...$` as mathematics: dollars are shown as dollars."""
    return text.replace("$", r"\$")
