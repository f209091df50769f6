"""`training-infra outputs`: the deployed stacks' outputs, for people and for scripts."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from training_infra import naming
from training_infra.cli.aws import OUTPUT_STACKS, SNAKE_TO_KEY, Aws, NotDeployedError, output_key_for
from training_infra.cli.errors import CliError, reported_errors
from training_infra.cli.options import Output, Region
from training_infra.cli.render import output_format, print_json


@reported_errors
def outputs(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="NAME",
            help="One output, printed raw like `terraform output -raw`: " + ", ".join(SNAKE_TO_KEY) + ".",
            show_default=False,
        ),
    ] = None,
    output: Output = "table",
    region: Region = None,
) -> None:
    """Print the deployed stacks' outputs by name, such as training_bucket.

    Without NAME: every output of every deployed stack as `name = value`. With NAME: the bare
    value, for scripts: `aws s3 ls s3://$(training-infra outputs training_bucket)/data/`.
    `--output json`: one JSON object of name -> value (with NAME too).
    """
    fmt = output_format(output)
    key = output_key_for(name) if name is not None else None
    aws = Aws(region)
    if key is not None:
        value = aws.output(key)
        if fmt == "json":
            print_json({naming.snake_case(key): value})
        else:
            sys.stdout.write(value + "\n")
        return
    missing, found = [], {}
    for stack in naming.ALL_STACKS:
        try:
            stack_outputs = aws.stack_outputs(stack)
        except NotDeployedError:
            missing.append(stack)
            continue
        for output_key in OUTPUT_STACKS:
            if OUTPUT_STACKS[output_key] == stack and output_key in stack_outputs:
                found[naming.snake_case(output_key)] = stack_outputs[output_key]
    if fmt == "json" and len(missing) < len(naming.ALL_STACKS):
        print_json(found)
    else:
        # One plain line each, never wrapped: ARNs and bucket names stay whole for copy and grep.
        for output_name, value in found.items():
            sys.stdout.write(f"{output_name} = {value}{_meaning(output_name, value)}\n")
    if len(missing) == len(naming.ALL_STACKS):
        raise CliError(f"no training-infra stack is deployed in {aws.region_name}: run `make deploy`")
    if missing:  # half a deployment is not one: the verbs that need the rest would fail
        raise CliError(
            f"{len(missing)} of {len(naming.ALL_STACKS)} stacks not deployed in {aws.region_name} "
            f"({', '.join(missing)}): run `make deploy`"
        )


def _meaning(name: str, value: str) -> str:
    """What a bare value means when it is not what it looks like (0 is no limit, not a limit of $0)."""
    if name == naming.snake_case(naming.OUTPUT_MONTHLY_LIMIT_USD) and value.strip() in ("0", "0.0", ""):
        return "  (no monthly limit)"
    return ""
