"""`--help` as plain text that reads at 80 columns and in a pipe.

click's own formatter wraps every paragraph at the screen's width (COLUMNS, else 80 when piped;
at most 78 wide) and never cuts a word or an option name: a long name pushes its help to the
next line, and a name or word with hyphens is never broken at them (`--instance-` / `types` would
not be found by a reader's search, nor pasted whole). Options are listed under their group
(typer's `rich_help_panel`: resources, limits, image and command, secrets ...) with their metavar
(`N`, `USD`, `TEXT`), never a Python type such as `<str>`. rich is not imported for help, which keeps `--help` fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from typer import _click as click
from typer._click import _textwrap
from typer.core import TyperCommand

OPTIONS = "Options"


def _names(param: Any) -> str:
    """`-t, --instance-type TYPE`; a flag pair as `--spot / --on-demand`."""
    metavar = "" if param.is_flag or param.count else f" {param.metavar or param.name.upper()}"
    names = ", ".join(sorted(param.opts, key=len)) + metavar
    if param.secondary_opts:
        names += " / " + ", ".join(sorted(param.secondary_opts, key=len))
    return names


def _default(param: Any, ctx: click.Context) -> str:
    """` [default: 20]` when the option shows its default and it says something."""
    if param.show_default is False or param.is_flag:
        return ""
    if isinstance(param.show_default, str):
        return f" [default: {param.show_default}]"
    resilient, ctx.resilient_parsing = ctx.resilient_parsing, True
    try:
        value = param.get_default(ctx, call=False)
    finally:
        ctx.resilient_parsing = resilient
    if value in (None, "", [], ()) or callable(value):
        return ""
    return f" [default: {value}]"


def records(command: click.Command, ctx: click.Context) -> list[tuple[str, list[tuple[str, str]]]]:
    """(group, [(names, help)]) in the order the groups first appear; arguments first."""
    groups: dict[str, list[tuple[str, str]]] = {}
    arguments: list[tuple[str, str]] = []
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        if param.param_type_name == "argument":
            arguments.append((param.metavar or param.name.upper(), getattr(param, "help", None) or ""))
            continue
        group = getattr(param, "rich_help_panel", None) or OPTIONS
        groups.setdefault(group, []).append((_names(param), (param.help or "") + _default(param, ctx)))
    # The general options (region, output, help) come last, after the groups a verb defines.
    ordered = [(name, rows) for name, rows in groups.items() if name != OPTIONS]
    if OPTIONS in groups:
        ordered.append((OPTIONS, groups[OPTIONS]))
    return ([("Arguments", arguments)] if arguments else []) + ordered


def write_options(command: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    for group, rows in records(command, ctx):
        with formatter.section(group):
            formatter.write_dl(rows, col_max=28)


class _WholeWords(_textwrap.TextWrapper):
    """click's wrapper, breaking only at spaces: never inside `--instance-types` or `on-demand`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "break_on_hyphens": False})


@contextmanager
def whole_words() -> Iterator[None]:
    """click's wrap_text imports `_textwrap.TextWrapper` on each call and takes no break_on_hyphens:
    the wrapper is swapped for the help's formatting only (one thread: the CLI's)."""
    original, _textwrap.TextWrapper = _textwrap.TextWrapper, _WholeWords
    try:
        yield
    finally:
        _textwrap.TextWrapper = original


def format_plain_help(command: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    with whole_words():
        click.Command.format_help(command, ctx, formatter)


class PlainHelpCommand(TyperCommand):
    """A verb whose `--help` is click's plain, wrapped text with grouped options."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_plain_help(self, ctx, formatter)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        write_options(self, ctx, formatter)


def first_sentence(command: click.Command) -> str:
    """A verb's line in the list of verbs: its help's first sentence, whole (wrapped, never cut)."""
    text = (command.short_help or command.help or "").strip().split("\n\n", 1)[0]
    text = " ".join(text.split())
    end = text.find(". ")
    return text[: end + 1] if end != -1 else text


def write_commands(group: Any, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    rows = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is not None and not command.hidden:
            rows.append((name, first_sentence(command)))
    if rows:
        with formatter.section("Commands"):
            formatter.write_dl(rows, col_max=12)
