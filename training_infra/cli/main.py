"""The `training-infra` command: every step of a training run in one verb.

Each verb reads the deployed stacks' outputs itself, so nobody copies ARNs or bucket names by
hand. Region and credentials come the standard boto3 way; AWS_ENDPOINT_URL points every verb at
the local AWS. This module only wires: each verb is in `cli/commands/<verb>.py`, tables and
figures in `cli/render.py`, where runs are read in `cli/source.py`.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer import _click as click  # typer's own copy of click: its exceptions are what parsing raises
from typer.core import TyperGroup

from training_infra.cli.commands import (
    connect,
    cost,
    fetch,
    launch,
    logs,
    outputs,
    schema,
    status,
    stop,
    tensorboard,
    upload,
    watch,
)
from training_infra.cli.errors import err_console, report_error
from training_infra.cli.helptext import PlainHelpCommand, format_plain_help, write_commands, write_options


def _one_line(error: click.exceptions.UsageError) -> str:
    """click's usage errors (unknown option, missing argument, a value of the wrong type) as one line."""
    if (
        isinstance(error, click.exceptions.BadParameter)
        and not isinstance(error, click.exceptions.MissingParameter)
        and error.param is not None
    ):
        param = error.param
        if param.param_type_name == "option":
            where = f"option '{max(param.opts, key=len)}'"
        else:
            where = f"argument '{param.human_readable_name}'"
        message = f"{where}: {error.message}"
    else:
        message = error.format_message()
    command = error.ctx.command_path if error.ctx is not None else "training-infra"
    return " ".join(f"{message} (see `{command} --help`)".split())


class _PlainHelpGroup(TyperGroup):
    """A verb group whose `--help` is plain text (cli/helptext.py)."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_plain_help(self, ctx, formatter)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        write_options(self, ctx, formatter)
        write_commands(self, ctx, formatter)


class _OneLineUsageErrors(_PlainHelpGroup):
    """Usage errors as the one `error: ...` line every other error is, exit 2 (not a boxed panel)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()
            sys.exit(error.exit_code)
        except click.exceptions.UsageError as error:
            report_error(_one_line(error))
            sys.exit(error.exit_code)
        except click.exceptions.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except typer.Abort:
            err_console().print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="training-infra",
    help=(
        "Run GPU training on the stacks deployed by `make deploy`.\n\n"
        "A typical run: `training-infra upload ./data`, `training-infra launch`, "
        "`training-infra logs RUN -f`, `training-infra fetch RUN`. "
        "`training-infra status` and `training-infra cost` show what is running and what it cost.\n\n"
        "Region and credentials are read the standard AWS way (AWS_PROFILE, AWS_REGION, ~/.aws, SSO); "
        "AWS_ENDPOINT_URL points every verb at another endpoint such as the local AWS emulator. "
        "Exit codes: 0 success, 1 AWS or runtime error, 2 usage error."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("training-infra")
        except PackageNotFoundError:
            number = "unknown (not installed; run `make setup`)"
        sys.stdout.write(f"training-infra {number}\n")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_version)
    ] = False,
) -> None:
    """Options before the verb."""


# The verbs, in the order `--help` lists them.
for verb in (outputs, upload, launch, status, watch, logs, tensorboard, connect, fetch, stop, cost, schema):
    app.command(cls=PlainHelpCommand)(getattr(verb, verb.__name__.rsplit(".", 1)[-1]))
del verb

from training_infra.cli.capacity import capacity_app  # noqa: E402 - the verbs above come first in --help
from training_infra.cli.commands.sweep import sweep_app  # noqa: E402
from training_infra.cli.local import local_app  # noqa: E402

# The sub-verbs' help reads like every other verb's (local24 owns cli/local.py: set here, not there).
for sub_app in (local_app, capacity_app, sweep_app):
    for info in sub_app.registered_commands:
        info.cls = PlainHelpCommand
    app.add_typer(sub_app, cls=_PlainHelpGroup)


def main() -> None:
    """Console-script entry point (`training-infra`)."""
    app(prog_name="training-infra")


if __name__ == "__main__":
    main()
