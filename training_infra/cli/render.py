"""Tables that stay readable at any width, and `--output json` for scripts.

A table is drawn only when every cell fits on one line at the console's width (a terminal's
width, else COLUMNS, else 80 when piped). Otherwise each row becomes a block of `column  value`
lines: nothing is wrapped into fragments or cut mid-word, and a value longer than the screen
stays one line for the terminal to soft-wrap (and for grep).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from training_infra.cli.errors import UsageError
from training_infra.cli.safe_text import remote_text

if TYPE_CHECKING:
    from rich.console import Console

OUTPUT_FORMATS = ("table", "json")
STATUS_FORMATS = ("table", "wide", "json")


def stdout() -> Console:
    """A console for this invocation: terminal width and COLUMNS are read when a verb runs.

    rich (like boto3's transfer manager) is imported by the verbs that use it, not at start-up.
    Soft wrap: a line longer than the screen is left for the terminal to fold, never broken by
    us mid-word (an S3 URL stays one line for copy and grep).
    """
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = int(seconds // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    return f"{hours}h {minutes:02d}m"


def fmt_usd(value: float | None) -> str:
    if value is None:
        return "-"
    if 0 < value < 0.01:
        return "<$0.01"
    return f"${value:,.2f}"


def fmt_time(moment: datetime | None) -> str:
    from training_infra.cli import runs

    return runs.iso_z(moment) if moment else "-"


def hhmm(moment: str | None) -> str:
    """A start or end as `MM-DD HH:MM` (UTC): short enough for the attempts table; JSON has the full time."""
    from training_infra.cli import runs

    parsed = runs.parse_time(moment)
    return parsed.strftime("%m-%d %H:%M") if parsed else "-"


def output_format(value: str, *, as_json: bool = False, allowed: Sequence[str] = OUTPUT_FORMATS) -> str:
    """`--output table|json` (the AWS CLI's convention); the older `--json` flag means json."""
    if as_json:
        return "json"
    if value not in allowed:
        raise UsageError(f"option '--output': got {value!r}; allowed: {', '.join(allowed)}")
    return value


def print_columns(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[str] = ()) -> None:
    """Rows as plain aligned columns, one line each, like `kubectl get`: read at 80 columns, grep and awk
    a pipe. The last column is never padded; no cell is wrapped or cut. Cells are printed as text."""
    cells = [list(headers), *([remote_text(cell) for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    out = []
    for line in cells:
        parts = [
            cell.rjust(width) if name in right else cell.ljust(width)
            for name, cell, width in zip(headers, line, widths, strict=True)
        ]
        out.append("  ".join(parts).rstrip() + "\n")
    sys.stdout.write("".join(out))


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


@dataclass
class Column:
    name: str
    right: bool = False  # numbers line up on the right


@dataclass
class Listing:
    """A titled table: rows of plain strings, an optional footer row (totals) and caption.

    Cells are printed as text, never as markup or escape sequences: many come from the box (status.json).
    """

    title: str
    columns: Sequence[Column]
    rows: list[Sequence[str]] = field(default_factory=list)
    footer: Sequence[str] | None = None
    caption: str = ""

    def table_width(self) -> int:
        """Width of the boxed table with every cell on one line: cells, one space either side, the rules."""
        from rich.cells import cell_len

        lines = [[c.name for c in self.columns], *self.rows, *([self.footer] if self.footer else [])]
        widths = [max(cell_len(remote_text(line[i])) for line in lines) for i in range(len(self.columns))]
        return sum(widths) + 3 * len(widths) + 1

    def print(self, console: Console) -> None:
        if self.table_width() <= console.width:
            self._table(console)
        else:
            self._records(console)

    def _table(self, console: Console) -> None:
        from rich.table import Table

        table = Table(title=self.title, caption=self.caption or None)
        for column in self.columns:
            table.add_column(column.name, justify="right" if column.right else "left", no_wrap=True)
        for row in self.rows:
            table.add_row(*(remote_text(cell, markup=True) for cell in row))
        if self.footer:
            table.add_section()
            table.add_row(*(remote_text(cell, markup=True) for cell in self.footer))
        console.print(table)

    def _records(self, console: Console) -> None:
        """One block per row, `column  value`, values never wrapped by us."""
        label = max(len(c.name) for c in self.columns)
        console.print(self.title, markup=False, soft_wrap=True)
        for row in [*self.rows, *([self.footer] if self.footer else [])]:
            console.print("", soft_wrap=True)
            for column, value in zip(self.columns, row, strict=True):
                if value == "" and row is self.footer:
                    continue
                console.print(f"{column.name:<{label}}  {remote_text(value)}", markup=False, soft_wrap=True)
        if self.caption:
            console.print("", soft_wrap=True)
            console.print(self.caption, markup=False, soft_wrap=True)
