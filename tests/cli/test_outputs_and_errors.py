"""`outputs` and the errors every verb shares: stacks not deployed, no credentials, bad input."""

from __future__ import annotations

import os
import subprocess
import sys

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
    assert set(lines) >= {"training_bucket", "outputs_bucket", "ecr_repository_uri", "alerts_topic_arn", "launch_template_id", "log_group_name"}


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
    result = subprocess.run([sys.executable, "-m", "training_infra", "status"], env=env, capture_output=True, text=True, timeout=60)

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
