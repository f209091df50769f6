"""Settings parse in plain Python: every bad value is one clear line, no synth needed."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT
from training_infra import config
from training_infra.config import (
    README_BEGIN,
    README_END,
    RULES,
    SETTING_NAMES,
    SETTINGS,
    ConfigError,
    Settings,
    parse_setting,
    parse_settings,
    readme_with_table,
    settings_table,
)


def test_defaults_are_cheap_and_safe():
    settings = parse_settings({})
    assert settings.instance_type == "g5.xlarge"
    assert settings.use_spot and settings.auto_shutdown
    assert settings.max_runtime_hours == 12
    assert not settings.create_instance
    assert not settings.github_enabled, "no default repository a stranger could register"
    assert settings.retain_data


def test_cdk_json_context_holds_exactly_the_settings_defaults():
    context = json.loads((ROOT / "cdk.json").read_text())["context"]
    settings_in_file = {key: value for key, value in context.items() if not key.startswith("@")}
    expected = Settings().to_context()
    expected.pop("ami_parameter")  # the long SSM path stays in code; override with -c ami_parameter=...
    assert settings_in_file == expected
    assert parse_settings(context) == Settings()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"use_spot": "false"}, {"use_spot": False}),
        ({"create_instance": "True"}, {"create_instance": True}),
        ({"max_runtime_hours": "1.5"}, {"max_runtime_hours": 1.5}),
        ({"idle_minutes": "45"}, {"idle_minutes": 45}),
        ({"volume_size_gb": 500}, {"volume_size_gb": 500}),
        ({"availability_zones": "us-east-1a, us-east-1b"}, {"availability_zones": ("us-east-1a", "us-east-1b")}),
        ({"spot_max_price": "0.75"}, {"spot_max_price": "0.75"}),
        ({"github_repo": "acme/trainer"}, {"github_repo": "acme/trainer"}),
        (
            {"instance_type": "p4d.24xlarge", "allowed_instance_types": "p4d.*,g5.xlarge"},
            {"instance_type": "p4d.24xlarge", "allowed_instance_types": ("p4d.*", "g5.xlarge")},
        ),
    ],
)
def test_command_line_strings_are_parsed_into_typed_values(raw, expected):
    settings = parse_settings(raw)
    for key, value in expected.items():
        assert getattr(settings, key) == value


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"use_spot": "yes"}, ["'use_spot'", "'yes'", "true or false"]),
        ({"auto_shutdown": "maybe"}, ["'auto_shutdown'", "'maybe'", "true or false"]),
        ({"max_runtime_hours": "-3"}, ["'max_runtime_hours'", "'-3'", "greater than 0"]),
        ({"max_runtime_hours": "twelve"}, ["'max_runtime_hours'", "'twelve'"]),
        ({"max_runtime_hours": "0"}, ["'max_runtime_hours'", "'0'"]),
        ({"idle_minutes": "2.5"}, ["'idle_minutes'", "'2.5'", "whole number"]),
        ({"volume_size_gb": "10"}, ["'volume_size_gb'", "'10'", "from 100"]),
        ({"idle_gpu_percent": "150"}, ["'idle_gpu_percent'", "'150'", "to 100"]),
        ({"monthly_budget_usd": "nan"}, ["'monthly_budget_usd'", "'nan'"]),
        ({"github_repo": "not a repo"}, ["'github_repo'", "'not a repo'", "owner/name"]),
        ({"github_repo": "acme/trainer/extra"}, ["'github_repo'", "owner/name"]),
        ({"github_branch": "feature..x"}, ["'github_branch'", "'feature..x'"]),
        ({"alert_email": "ml-team@"}, ["'alert_email'", "'ml-team@'", "e-mail"]),
        ({"instance_type": "x9.xlarge"}, ["'instance_type'", "'x9.xlarge'", "g5"]),
        ({"instance_type": "p5.48xlarge"}, ["'allowed_instance_types'", "allows instance_type"]),
        ({"allowed_instance_types": "zz.*"}, ["'allowed_instance_types'", "'zz.*'", "families of"]),
        ({"instance_type": "g5"}, ["'instance_type'", "'g5'", "g5.xlarge"]),
        ({"image_id": "ami-123"}, ["'image_id'", "'ami-123'"]),
        ({"vpc_id": "vpc-1"}, ["'vpc_id'", "'vpc-1'"]),
        ({"run_id": "Bert_Run"}, ["'run_id'", "'Bert_Run'", "lowercase"]),
        ({"log_retention_days": "10"}, ["'log_retention_days'", "'10'", "14"]),
        ({"spot_max_price": "-1"}, ["'spot_max_price'", "'-1'"]),
        ({"ecr_repository_name": "Training"}, ["'ecr_repository_name'", "'Training'", "lowercase"]),
        ({"existing_oidc_provider_arn": "arn:aws:iam::1:oidc-provider/x"}, ["'existing_oidc_provider_arn'"]),
        ({"availability_zones": "us-east-1"}, ["'availability_zones'", "'us-east-1'"]),
    ],
)
def test_bad_value_gives_one_line_naming_setting_value_and_what_is_allowed(raw, fragments):
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw)
    message = str(caught.value)
    assert "\n" not in message
    assert "allowed:" in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("instance_typ", "instance_type"), ("use_sport", "use_spot"), ("max_runtime_hour", "max_runtime_hours")],
)
def test_unknown_setting_that_looks_like_a_typo_is_refused_with_a_suggestion(typo, meant):
    with pytest.raises(ConfigError, match=f"unknown setting '{typo}': did you mean '{meant}'"):
        parse_settings({typo: "x"})


def test_cdk_internal_context_keys_are_not_mistaken_for_typos():
    parse_settings(
        {"@aws-cdk/core:stackRelativeExports": True, "aws:cdk:enable-path-metadata": True, "cdk-default-account": "1"}
    )


VPC = "vpc-0123456789abcdef0"
SUBNET = "subnet-0123456789abcdef0"
OIDC_ARN = "arn:aws:iam::123456789012:oidc-provider/token.actions.githubusercontent.com"


@pytest.mark.parametrize(
    ("raw", "setting"),
    [
        ({"existing_oidc_provider_arn": OIDC_ARN}, "github_repo"),
        ({"use_spot": "false", "spot_max_price": "1"}, "spot_max_price"),
        ({"vpc_id": VPC}, "subnet_ids"),
        ({"subnet_ids": SUBNET}, "subnet_ids"),
        ({"vpc_id": VPC, "subnet_ids": SUBNET, "private_networking": "true"}, "private_networking"),
        ({"vpc_id": VPC, "subnet_ids": SUBNET, "availability_zones": "us-east-1a"}, "availability_zones"),
    ],
)
def test_settings_that_contradict_each_other_are_refused_with_the_rule_that_is_broken(raw, setting):
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw)
    message = str(caught.value)
    assert message.startswith(f"setting '{setting}': got ")
    assert any(message.endswith(f"; allowed: {rule.allowed}") for rule in RULES if rule.setting == setting)


def test_every_rule_is_about_a_declared_setting():
    assert {rule.setting for rule in RULES} <= set(SETTING_NAMES)


@pytest.mark.parametrize("spec", SETTINGS, ids=lambda spec: spec.name)
def test_each_declared_default_is_a_value_its_own_parser_accepts(spec):
    assert parse_setting(spec.name, spec.context_value(spec.default)) == spec.default


@pytest.mark.parametrize("spec", SETTINGS, ids=lambda spec: spec.name)
def test_each_declared_parser_refuses_a_value_of_the_wrong_kind_in_its_one_line(spec):
    with pytest.raises(ConfigError) as caught:
        parse_setting(spec.name, {"not": "a setting value"})
    head, allowed = str(caught.value).split("; allowed: ")
    assert head == f"setting '{spec.name}': got {{'not': 'a setting value'}}"
    assert allowed and spec.allowed.startswith(allowed) and "\n" not in allowed


def test_parse_setting_names_the_label_it_is_given_so_the_cli_reports_its_own_option():
    with pytest.raises(ConfigError) as caught:
        parse_setting("run_id", "My Run", label="option '--run-id'")
    assert str(caught.value).startswith("option '--run-id': got 'My Run'; allowed: empty or lowercase letters")
    assert parse_setting("run_id", " bert-lr3e4 ", label="option '--run-id'") == "bert-lr3e4"


def test_parse_setting_refuses_a_name_that_is_not_a_setting():
    with pytest.raises(ConfigError, match="unknown setting 'instance'"):
        parse_setting("instance", "g5.xlarge")


def test_instance_type_error_says_whether_the_shape_or_the_family_is_wrong():
    with pytest.raises(ConfigError, match="allowed: an EC2 instance type such as g5.xlarge$"):
        parse_setting("instance_type", "g5.huge")
    with pytest.raises(ConfigError, match="allowed: a type in one of the families g4dn, "):
        parse_setting("instance_type", "x1e.xlarge")


def _table_rows(table: str) -> list[list[str]]:
    lines = table.strip().splitlines()
    assert lines[0] == "| Setting | Default | Allowed | Meaning |"
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def test_settings_table_has_one_row_per_setting_with_its_default_allowed_values_and_meaning():
    rows = _table_rows(settings_table())
    assert [row[0] for row in rows] == [f"`{name}`" for name in SETTING_NAMES]
    by_name = {row[0].strip("`"): row for row in rows}
    for spec in SETTINGS:
        _, default, allowed, meaning = by_name[spec.name]
        assert allowed.startswith(spec.allowed) and meaning == spec.meaning
        assert default != ""
    assert by_name["use_spot"][1] == "`true`" and by_name["run_id"][1] == "empty"
    assert by_name["max_runtime_hours"][1] == "`12`" and by_name["subnet_ids"][1] == "empty"
    assert "empty when use_spot is false" in by_name["spot_max_price"][2], "the rules show under the setting they limit"


def test_readme_settings_table_is_the_one_generated_from_the_declarations():
    readme = (ROOT / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme
    assert readme_with_table(readme) == readme, (
        "README's settings table is stale: run `python -m training_infra.config --write-readme` and commit README.md"
    )


def test_write_readme_command_rewrites_only_the_table_between_the_markers(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nprose before\n\n{README_BEGIN}\n| old | table |\n{README_END}\n\nprose after\n")
    monkeypatch.setattr(config, "README", readme)
    config.main(["--write-readme"])
    text = readme.read_text()
    assert text == f"# Title\n\nprose before\n\n{README_BEGIN}\n{settings_table()}{README_END}\n\nprose after\n"
    config.main(["--write-readme"])
    assert readme.read_text() == text, "running it twice changes nothing"


def test_write_readme_refuses_a_readme_without_the_markers_and_leaves_it_as_is(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nno settings block\n")
    monkeypatch.setattr(config, "README", readme)
    with pytest.raises(SystemExit) as exited:
        config.main(["--write-readme"])
    assert exited.value.code == 2
    assert "README has no settings block" in capsys.readouterr().err
    assert readme.read_text() == "# Title\n\nno settings block\n"


def test_markdown_command_prints_the_settings_table(capsys):
    config.main(["--markdown"])
    assert capsys.readouterr().out == settings_table()
