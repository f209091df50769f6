"""Settings parse in plain Python: every bad value is one clear line, no synth needed."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT
from training_infra.config import ConfigError, Settings, parse_settings


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
        ({"instance_type": "p4d.24xlarge"}, {"instance_type": "p4d.24xlarge"}),
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


@pytest.mark.parametrize(("typo", "meant"), [("instance_typ", "instance_type"), ("use_sport", "use_spot"), ("max_runtime_hour", "max_runtime_hours")])
def test_unknown_setting_that_looks_like_a_typo_is_refused_with_a_suggestion(typo, meant):
    with pytest.raises(ConfigError, match=f"unknown setting '{typo}': did you mean '{meant}'"):
        parse_settings({typo: "x"})


def test_cdk_internal_context_keys_are_not_mistaken_for_typos():
    parse_settings({"@aws-cdk/core:stackRelativeExports": True, "aws:cdk:enable-path-metadata": True, "cdk-default-account": "1"})


@pytest.mark.parametrize(
    ("raw", "setting"),
    [
        ({"existing_oidc_provider_arn": "arn:aws:iam::123456789012:oidc-provider/token.actions.githubusercontent.com"}, "github_repo"),
        ({"use_spot": "false", "spot_max_price": "1"}, "spot_max_price"),
        ({"vpc_id": "vpc-0123456789abcdef0"}, "subnet_ids"),
        ({"vpc_id": "vpc-0123456789abcdef0", "subnet_ids": "subnet-0123456789abcdef0", "private_networking": "true"}, "private_networking"),
    ],
)
def test_settings_that_contradict_each_other_are_refused(raw, setting):
    with pytest.raises(ConfigError, match=f"setting '{setting}'"):
        parse_settings(raw)
