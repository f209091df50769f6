"""One-line errors instead of tracebacks.

Every verb runs inside `reported_errors`, which turns the failures a user can act on (no
credentials, no region, stacks not deployed, an unknown run, an AWS refusal) into one line on
stderr and the exit codes the manual promises: 1 for AWS/runtime errors, 2 for usage errors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

if TYPE_CHECKING:
    from rich.console import Console

EXIT_RUNTIME = 1
EXIT_USAGE = 2

_CREDENTIAL_CODES = {
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "AuthFailure",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "RequestExpired",
}

F = TypeVar("F", bound=Callable[..., Any])


def err_console() -> Console:
    """stderr for errors and notes, so `training-infra outputs NAME` stays pipeable.

    rich is imported on first use: a verb that prints nothing (`launch -q`) never loads it.
    """
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def report_error(message: str) -> None:
    """`error: <message>` on stderr, the message printed as is (no markup); one such line per line."""
    from rich.text import Text

    for line in message.splitlines() or [""]:
        err_console().print(Text.assemble(("error: ", "bold red"), line))


class CliError(Exception):
    """A failure the user can act on; the message is the whole story, one line."""

    exit_code = EXIT_RUNTIME


class UsageError(CliError):
    """Bad input on the command line (exit 2)."""

    exit_code = EXIT_USAGE


def describe_aws_error(error: Exception) -> str:
    """The one line for an exception raised by boto3 (or our own CliError)."""
    if isinstance(error, CliError):
        return str(error)
    import botocore.exceptions
    from botocore.parsers import ResponseParserError

    if isinstance(error, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        return (
            "no AWS credentials found: run `aws configure` or `aws sso login`, "
            "or set AWS_PROFILE / AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(error, botocore.exceptions.NoRegionError):
        return "no AWS region configured: pass --region, or set AWS_DEFAULT_REGION (or region in ~/.aws/config)"
    if isinstance(error, botocore.exceptions.ProfileNotFound):
        return f"{error}: check AWS_PROFILE and ~/.aws/config"
    if isinstance(error, botocore.exceptions.TokenRetrievalError | botocore.exceptions.SSOTokenLoadError):
        return f"AWS login expired ({error}): run `aws sso login`"
    if isinstance(error, botocore.exceptions.EndpointConnectionError):
        return (
            f"cannot reach AWS at {error.kwargs.get('endpoint_url', '?')}: "
            "check the network, the region and AWS_ENDPOINT_URL"
        )
    if isinstance(error, botocore.exceptions.ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message", "") or str(error)
        operation = getattr(error, "operation_name", "the AWS call")
        if code in _CREDENTIAL_CODES:
            return f"AWS rejected the credentials ({code}: {message}): refresh them (`aws sso login`, `aws configure`)"
        return f"AWS refused {operation}: {code}: {message}"
    if isinstance(error, botocore.exceptions.BotoCoreError):
        return f"AWS error: {error}"
    if isinstance(error, ResponseParserError):
        # Not a BotoCoreError: an endpoint that answered with something other than AWS's format
        # (an HTML error page from a proxy, or the emulator failing).
        first = str(error).split("\n", 1)[0]
        return (
            f"the AWS endpoint answered something that is not an AWS response ({first}): "
            "check AWS_ENDPOINT_URL and retry"
        )
    raise error


def _from_aws(error: Exception) -> bool:
    """botocore's errors, and what an endpoint that is not AWS answers (not a BotoCoreError).

    Checked only once an error happened: botocore is not imported for `--help`."""
    import botocore.exceptions
    from botocore.parsers import ResponseParserError

    return isinstance(error, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError | ResponseParserError)


def reported_errors(command: F) -> F:
    """Run a verb and report the failures above as one line and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CliError as error:
            report_error(describe_aws_error(error))
            raise typer.Exit(error.exit_code) from None
        except Exception as error:
            if _from_aws(error):
                report_error(describe_aws_error(error))
                raise typer.Exit(EXIT_RUNTIME) from None
            if not isinstance(error, OSError):
                raise
            # Local files: a dataset file that cannot be read, a full disk while fetching.
            where = f": {error.filename}" if error.filename else ""
            report_error(f"{error.strerror or error}{where}")
            raise typer.Exit(EXIT_RUNTIME) from None
        except KeyboardInterrupt:
            err_console().print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
