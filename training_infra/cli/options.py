"""Options and arguments several verbs share, and the checks every verb runs on them."""

from __future__ import annotations

from typing import Annotated

import typer

from training_infra.cli.errors import UsageError

Region = Annotated[
    str | None,
    typer.Option(
        "--region",
        help="AWS region of the stacks (default: AWS_DEFAULT_REGION, your profile's region, else AWS_REGION).",
        show_default=False,
    ),
]
Output = Annotated[
    str,
    typer.Option(
        "--output",
        "-o",
        metavar="table|json",
        help="table (for people; one block per run when the screen is narrow) or json (for scripts).",
    ),
]
# The older spelling of `--output json`, kept for scripts written against it.
JsonFlag = Annotated[bool, typer.Option("--json", hidden=True)]
RunArg = Annotated[
    str,
    typer.Argument(metavar="RUN", help="Run id, as printed by `launch` and listed by `status`.", show_default=False),
]


def check_run_id(run_id: str) -> str:
    """Run ids are tag values and S3 folder names: reject anything else before calling AWS."""
    from training_infra.cli import launching

    value = launching.check("run_id", "RUN", run_id, kind="argument")
    if not value:
        raise UsageError("argument 'RUN': got ''; allowed: a run id such as 20261128-160000-ab12")
    return value


def node_index(value: str) -> int:
    """A gang's node K for `--node`, parsed here so a bad one is the same one-line error as every other option."""
    text = value.strip()
    if not text.isdigit() or int(text) >= 64:
        raise UsageError(f"option '--node': got {value!r}; allowed: a node index from 0 to the run's nodes - 1")
    return int(text)


def whole_number(option: str, value: str) -> int:
    """Counts are parsed here, so a bad one is the same one-line error as every other option."""
    if not value.strip().isdigit() or int(value) < 1:
        raise UsageError(f"option '{option}': got {value!r}; allowed: a whole number of at least 1")
    return int(value)
