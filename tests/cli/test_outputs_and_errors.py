"""`outputs` and the errors every verb shares: stacks not deployed, no credentials, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from training_infra import naming
from training_infra.cli.main import app

# Every verb that needs a stack, with arguments that are valid up to the AWS calls.
VERBS_NEEDING_STACKS = [
    ("outputs", "training_bucket"),
    ("launch",),
    ("status",),
    ("logs", "some-run"),
    ("fetch", "latest"),
    ("cost",),
]


def test_outputs_lists_every_deployed_output_under_the_seeds_snake_case_names(stacks):
    result = stacks.cli("outputs")

    assert result.exit_code == 0, result.output
    lines = dict(line.split(" = ", 1) for line in result.stdout.splitlines())
    assert lines == {naming.snake_case(key): value for key, value in stacks.outputs.items()}
    assert set(lines) >= {
        "training_bucket",
        "outputs_bucket",
        "ecr_repository_uri",
        "alerts_topic_arn",
        "launch_template_id",
        "log_group_name",
    }


def test_outputs_name_prints_only_the_raw_value_for_scripts(stacks):
    result = stacks.cli("outputs", "outputs_bucket")

    assert result.exit_code == 0, result.output
    assert result.stdout == stacks.outputs_bucket + "\n"


def test_outputs_unknown_name_lists_the_known_names_and_exits_2(stacks):
    result = stacks.cli("outputs", "data_bucket")

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "unknown output 'data_bucket'" in result.stderr
    for known in ("training_bucket", "outputs_bucket", "launch_template_id", "instance_id"):
        assert known in result.stderr


def test_outputs_name_absent_by_setting_explains_which_setting(stacks):
    result = stacks.cli("outputs", "instance_id")

    assert result.exit_code == 1
    assert "create_instance=true" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("argv", VERBS_NEEDING_STACKS, ids=lambda argv: argv[0])
def test_every_verb_says_in_one_line_when_the_stacks_are_not_deployed_in_the_region(stacks, argv):
    result = stacks.cli(*argv, "--region", "ap-southeast-2")

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.count("\n") == 1
    assert "is not deployed in ap-southeast-2: run `make deploy`" in result.stderr
    assert result.stderr.startswith("error: stack TrainingInfra-")


def test_missing_credentials_is_one_clear_line_from_python_m_training_infra(stacks, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=stacks.emulator.endpoint,
        AWS_DEFAULT_REGION=stacks.region,
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    result = subprocess.run(
        [sys.executable, "-m", "training_infra", "status"], env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 1
    assert result.stderr.startswith("error: no AWS credentials found")
    assert result.stderr.count("\n") == 1


def test_missing_region_names_the_option_and_the_variable(stacks):
    env = {"AWS_REGION": "", "AWS_DEFAULT_REGION": ""}
    result = stacks.runner.invoke(app, ["outputs"], env={**stacks.env, **env})

    assert result.exit_code == 1
    assert "no AWS region configured: pass --region" in result.stderr


def test_unreachable_endpoint_is_reported_not_a_traceback(stacks):
    result = stacks.cli("status", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"})

    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach AWS at http://127.0.0.1:9")
    assert result.stderr.count("\n") == 1, "one line, no traceback"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("status", "Bad_Run"), "argument 'RUN': got 'Bad_Run'"),
        (("stop", "x" * 64), "argument 'RUN'"),
        (("logs", "../etc"), "argument 'RUN': got '../etc'"),
        (("fetch", "UPPER"), "argument 'RUN': got 'UPPER'"),
        (("upload", "/definitely/not/here"), "argument 'PATH': got '/definitely/not/here'"),
    ],
)
def test_bad_run_ids_and_paths_are_one_line_usage_errors_naming_the_argument_before_calling_aws(stacks, argv, fragment):
    assert fragment in stacks.usage_error(*argv)


def test_help_reads_like_a_manual_for_every_verb(stacks):
    top = stacks.cli("--help")
    assert top.exit_code == 0
    for verb in ("outputs", "upload", "launch", "status", "logs", "connect", "fetch", "stop", "cost"):
        assert verb in top.stdout
        page = stacks.cli(verb, "--help")
        assert page.exit_code == 0, verb
        assert f"Usage: training-infra {verb}" in page.stdout
        assert "--region" in page.stdout


def test_console_script_entry_point_is_the_typer_app():
    from importlib.metadata import entry_points

    from training_infra.cli.main import main

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    assert scripts["training-infra"].load() is main


@pytest.mark.parametrize("endpoint", ["localhost:5610", "not a url at all"])
def test_aws_endpoint_url_without_a_scheme_is_one_line_naming_the_variable(stacks, endpoint):
    """Issue 14: botocore's "Invalid endpoint" was a 62-line traceback; the AWS CLI prints one line."""
    env = {**os.environ, **stacks.env, "AWS_ENDPOINT_URL": endpoint}
    result = subprocess.run(
        [sys.executable, "-m", "training_infra", "status"], env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 1
    assert result.stderr == (
        f"error: environment variable 'AWS_ENDPOINT_URL': got {endpoint!r}; allowed: a URL with its scheme, "
        "such as http://localhost:5000 or https://s3.us-east-1.amazonaws.com\n"
    )


def test_other_botocore_configuration_errors_are_one_line(stacks):
    result = stacks.cli("outputs", env={"AWS_ENDPOINT_URL": "http://[not-an-ipv6"})

    assert result.exit_code == 1
    assert result.stderr.startswith("error: AWS configuration error: ")
    assert result.stderr.count("\n") == 1


def test_an_endpoint_answering_an_html_error_page_is_one_line_not_a_parser_traceback(stacks):
    """What a proxy, or the emulator failing, answers: botocore's ResponseParserError is not a BotoCoreError."""

    class HtmlErrorPage(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b"<!doctype html><title>500 Internal Server Error</title>"
            self.send_response(500)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), HtmlErrorPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = stacks.cli(
            "outputs", env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}", "AWS_MAX_ATTEMPTS": "1"}
        )
    finally:
        server.shutdown()
        server.server_close()

    assert result.exit_code == 1
    assert result.stderr.startswith("error: the AWS endpoint answered something that is not an AWS response")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("status", "--limit", "x"), "option '--limit': got 'x'; allowed: a whole number of at least 1"),
        (("cost", "--days", "0"), "option '--days': got '0'; allowed: a whole number of at least 1"),
        (("status", "--qqq"), "No such option: --qqq (see `training-infra status --help`)"),
        (("logs",), "Missing argument 'RUN'. (see `training-infra logs --help`)"),
        (("lanch",), "No such command 'lanch'."),
        (("status", "--region"), "Option '--region' requires an argument."),
    ],
)
def test_every_usage_error_is_the_same_one_line_as_the_others_with_exit_2(stacks, argv, fragment):
    """Issue 14: `--max-runtime-hours abc` (and every click-parsed mistake) printed a boxed multi-line panel."""
    assert fragment in stacks.usage_error(*argv)


def test_version_prints_the_installed_version(stacks):
    from importlib.metadata import version

    result = stacks.cli("--version")

    assert result.exit_code == 0
    assert result.stdout == f"training-infra {version('training-infra')}\n"
