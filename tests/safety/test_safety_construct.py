"""Template assertions for TrainingSafety, plus the gates (cdk-nag, cfn-lint, checkov) on its template.

Two whole-app configurations from the shared session synth (tests/conftest.py): the cdk.json
defaults (no e-mail) and "full" (e-mail, budget, max runtime, retention, no reservations).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aws_cdk.assertions import Match

from training_infra import naming

VENV_BIN = Path(sys.executable).parent


def _safety_view(synthesized):
    """The safety stack of a whole-app synth, with its construct at hand."""
    view = synthesized.stack(naming.SAFETY_STACK)
    view.safety = view.construct("Safety")
    view.settings = synthesized.settings
    view.path = synthesized.outdir / f"{naming.SAFETY_STACK}.template.json"
    return view


@pytest.fixture(scope="module")
def defaults(synth):
    """The cdk.json defaults: no e-mail, 100 USD, 12 h, 30-day logs, reserved concurrency."""
    return _safety_view(synth("defaults"))


@pytest.fixture(scope="module")
def custom(synth):
    """The "full" configuration: e-mail, 250 USD, 3.5 h, 14-day logs, no reserved concurrency."""
    return _safety_view(synth("full"))


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def policy_of_role(view, function) -> list[dict]:
    return view.role_statements(function.role)


# --- alert topic and key ---------------------------------------------------------------------


def test_topic_is_encrypted_with_the_rotating_customer_managed_key(defaults):
    key_id = defaults.logical_id(defaults.safety.alerts_key)
    defaults.template.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})
    defaults.template.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": {"Fn::GetAtt": [key_id, "Arn"]}})


SNS_TOPIC_CONTEXT = "kms:EncryptionContext:aws:sns:topicArn"
THIS_ACCOUNTS_TOPICS = {
    "Fn::Join": [
        "",
        ["arn:", {"Ref": "AWS::Partition"}, ":sns:", {"Ref": "AWS::Region"}, ":", {"Ref": "AWS::AccountId"}, ":*"],
    ]
}


def test_key_policy_lets_the_alert_services_make_data_keys_only_for_this_accounts_topics(defaults):
    [service_statement] = [s for s in defaults.statements("AWS::KMS::Key", "KeyPolicy") if "Service" in s["Principal"]]
    assert service_statement["Effect"] == "Allow"
    assert sorted(as_list(service_statement["Principal"]["Service"])) == [
        "budgets.amazonaws.com",
        "cloudwatch.amazonaws.com",
        "events.amazonaws.com",
    ]
    assert sorted(as_list(service_statement["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert service_statement["Condition"] == {"StringLike": {SNS_TOPIC_CONTEXT: THIS_ACCOUNTS_TOPICS}}


def test_functions_may_use_the_key_only_through_sns_for_the_alert_topic(defaults):
    topic_ref = {"Ref": defaults.logical_id(defaults.safety.alerts_topic)}
    for function in (defaults.safety.reaper, defaults.safety.notifier):
        [kms_statement] = [
            s for s in policy_of_role(defaults, function) if any(a.startswith("kms:") for a in as_list(s["Action"]))
        ]
        assert sorted(kms_statement["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey"]
        conditions = kms_statement["Condition"]["StringEquals"]
        assert conditions[SNS_TOPIC_CONTEXT] == topic_ref
        assert conditions["kms:ViaService"] == {
            "Fn::Join": ["", ["sns.", {"Ref": "AWS::Region"}, ".", {"Ref": "AWS::URLSuffix"}]]
        }


def test_topic_policy_denies_publishing_without_tls(defaults):
    denies = [s for s in defaults.statements("AWS::SNS::TopicPolicy", "PolicyDocument") if s["Effect"] == "Deny"]
    assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} and s["Principal"] == "*" for s in denies)


def test_topic_policy_lets_each_alert_service_publish_only_for_this_account(defaults):
    allows = [s for s in defaults.statements("AWS::SNS::TopicPolicy", "PolicyDocument") if s["Effect"] == "Allow"]
    services = sorted(service for s in allows for service in as_list(s["Principal"]["Service"]))
    assert services == ["budgets.amazonaws.com", "cloudwatch.amazonaws.com", "events.amazonaws.com"]
    for statement in allows:
        assert statement["Action"] == "sns:Publish"
        assert statement["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
        assert "aws:SourceArn" in statement["Condition"]["ArnLike"]


def test_eventbridge_may_publish_only_from_the_two_spot_warning_rules(defaults):
    [events_statement] = [
        s
        for s in defaults.statements("AWS::SNS::TopicPolicy", "PolicyDocument")
        if s["Effect"] == "Allow" and s["Principal"]["Service"] == "events.amazonaws.com"
    ]
    rules = [
        defaults.one("AWS::Events::Rule", EventPattern={"detail-type": [detail_type], "source": ["aws.ec2"]})[0]
        for detail_type in ("EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation")
    ]
    assert events_statement["Condition"]["ArnLike"]["aws:SourceArn"] == [
        {"Fn::GetAtt": [rule, "Arn"]} for rule in rules
    ]


def test_no_statement_lets_anyone_publish_unconditionally(defaults):
    for statement in defaults.statements("AWS::SNS::TopicPolicy", "PolicyDocument"):
        if statement["Effect"] == "Allow":
            assert statement["Principal"] != "*" and "AWS" not in statement["Principal"]
            assert statement.get("Condition"), statement


def test_email_subscription_exists_only_when_alert_email_is_set(defaults, custom):
    defaults.template.resource_count_is("AWS::SNS::Subscription", 0)
    custom.template.resource_count_is("AWS::SNS::Subscription", 1)
    custom.template.has_resource_properties(
        "AWS::SNS::Subscription",
        {
            "Protocol": "email",
            "Endpoint": "ml-team@example.com",
            "TopicArn": {"Ref": custom.logical_id(custom.safety.alerts_topic)},
        },
    )


# --- budget ----------------------------------------------------------------------------------


def test_monthly_cost_budget_uses_the_setting(defaults, custom):
    for synth, amount in ((defaults, 100), (custom, 250)):
        synth.template.has_resource_properties(
            "AWS::Budgets::Budget",
            {"Budget": {"BudgetType": "COST", "TimeUnit": "MONTHLY", "BudgetLimit": {"Amount": amount, "Unit": "USD"}}},
        )


def test_budget_notifies_the_topic_at_actual_50_80_100_and_forecast_100_percent(defaults):
    topic_ref = {"Ref": defaults.logical_id(defaults.safety.alerts_topic)}
    [(_, budget)] = defaults.resources("AWS::Budgets::Budget").items()
    notifications = budget["Properties"]["NotificationsWithSubscribers"]
    seen = sorted((n["Notification"]["NotificationType"], n["Notification"]["Threshold"]) for n in notifications)
    assert seen == [("ACTUAL", 50), ("ACTUAL", 80), ("ACTUAL", 100), ("FORECASTED", 100)]
    for n in notifications:
        assert n["Notification"]["ThresholdType"] == "PERCENTAGE"
        assert n["Notification"]["ComparisonOperator"] == "GREATER_THAN"
        assert n["Subscribers"] == [{"SubscriptionType": "SNS", "Address": topic_ref}]


def test_budget_is_created_after_the_topic_policy_that_lets_it_publish(defaults):
    [(_, budget)] = defaults.resources("AWS::Budgets::Budget").items()
    [policy_id] = defaults.resources("AWS::SNS::TopicPolicy")
    assert policy_id in budget.get("DependsOn", [])


# --- reaper ----------------------------------------------------------------------------------


def test_reaper_runs_the_newest_python_with_one_reserved_slot_and_a_timeout(defaults):
    reaper_id = defaults.logical_id(defaults.safety.reaper)
    reaper = defaults.json["Resources"][reaper_id]["Properties"]
    assert reaper["Runtime"] == "python3.14"
    assert reaper["Handler"] == "reaper.handler"
    assert reaper["ReservedConcurrentExecutions"] == 1
    assert 30 <= reaper["Timeout"] <= 300


def test_new_accounts_can_turn_reserved_concurrency_off(custom):
    functions = custom.resources("AWS::Lambda::Function").values()
    assert functions
    assert all("ReservedConcurrentExecutions" not in function["Properties"] for function in functions)


def test_newest_python_runtime_is_what_this_cdk_offers():
    """Fails when aws-cdk-lib gains a newer Python runtime, so the reaper does not lag behind."""
    from aws_cdk import aws_lambda

    offered = [name for name in dir(aws_lambda.Runtime) if name.startswith("PYTHON_3_")]
    newest = max(offered, key=lambda name: int(name.rsplit("_", 1)[1]))
    assert newest == "PYTHON_3_14"


def test_reaper_gets_settings_and_shared_names_from_the_environment(defaults, custom):
    for synth, hours in ((defaults, "12"), (custom, "3.5")):
        env = synth.json["Resources"][synth.logical_id(synth.safety.reaper)]["Properties"]["Environment"]["Variables"]
        assert env["MAX_RUNTIME_HOURS"] == hours
        assert env["TOPIC_ARN"] == {"Ref": synth.logical_id(synth.safety.alerts_topic)}
        assert env["MANAGED_TAG"] == naming.TAG_MANAGED
        assert env["DEADLINE_TAG"] == naming.TAG_DEADLINE
        assert env["MAX_RUNTIME_TAG"] == naming.TAG_MAX_RUNTIME_HOURS
        assert env["METRIC_NAMESPACE"] == naming.METRIC_NAMESPACE


def test_reaper_runs_every_five_minutes(defaults):
    reaper_arn = {"Fn::GetAtt": [defaults.logical_id(defaults.safety.reaper), "Arn"]}
    defaults.template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "ScheduleExpression": "rate(5 minutes)",
            "State": "ENABLED",
            "Targets": [Match.object_like({"Arn": reaper_arn})],
        },
    )


PROFILE_ARNS = {
    "Fn::Join": [
        "",
        [
            "arn:",
            {"Ref": "AWS::Partition"},
            ":iam::",
            {"Ref": "AWS::AccountId"},
            f":instance-profile{naming.INSTANCE_PROFILE_PATH}",
        ],
    ]
}


def test_reaper_may_terminate_only_instances_tagged_managed_and_launched_with_the_project_profile(defaults):
    """Issue 15, item 4: a tag anyone who may tag can add is not enough; the instance profile path is the second key."""
    statements = policy_of_role(defaults, defaults.safety.reaper)
    terminate = [s for s in statements if "ec2:TerminateInstances" in as_list(s["Action"])]
    assert len(terminate) == 1
    profile_pattern = {"Fn::Join": ["", [*PROFILE_ARNS["Fn::Join"][1][:-1], f"{PROFILE_ARNS['Fn::Join'][1][-1]}*"]]}
    assert terminate[0]["Condition"] == {
        "StringEquals": {f"aws:ResourceTag/{naming.TAG_MANAGED}": "true"},
        "ArnLike": {"ec2:InstanceProfile": profile_pattern},
    }
    assert terminate[0]["Resource"] != "*"


def test_reaper_selects_by_the_same_instance_profile_path_its_role_is_limited_to(defaults):
    env = defaults.json["Resources"][defaults.logical_id(defaults.safety.reaper)]["Properties"]["Environment"][
        "Variables"
    ]
    assert env["INSTANCE_PROFILE_ARN_PREFIX"] == PROFILE_ARNS


def test_functions_use_resource_star_only_where_aws_has_no_resource_scoping(defaults):
    expected = {
        defaults.safety.reaper: ["cloudwatch:PutMetricData", "ec2:DescribeInstances"],
        defaults.safety.notifier: ["ec2:DescribeInstances"],
    }
    for function, actions in expected.items():
        statements = policy_of_role(defaults, function)
        assert sorted(a for s in statements if s["Resource"] == "*" for a in as_list(s["Action"])) == actions
    [metric] = [
        s for s in policy_of_role(defaults, defaults.safety.reaper) if s["Action"] == "cloudwatch:PutMetricData"
    ]
    assert metric["Condition"] == {"StringEquals": {"cloudwatch:namespace": naming.METRIC_NAMESPACE}}


def test_function_roles_hold_no_wildcard_actions_and_no_managed_policies(defaults):
    for function in (defaults.safety.reaper, defaults.safety.notifier):
        for statement in policy_of_role(defaults, function):
            for action in as_list(statement["Action"]):
                assert "*" not in action, statement
    for role in defaults.resources("AWS::IAM::Role").values():
        assert "ManagedPolicyArns" not in role["Properties"]


def test_no_policy_anywhere_allows_every_action(defaults):
    documents = [
        *defaults.statements("AWS::IAM::Policy", "PolicyDocument"),
        *defaults.statements("AWS::KMS::Key", "KeyPolicy"),
        *defaults.statements("AWS::SNS::TopicPolicy", "PolicyDocument"),
    ]
    assert documents
    for statement in documents:
        assert "*" not in as_list(statement["Action"]), statement


def test_functions_log_to_their_own_group_with_the_configured_retention(defaults, custom):
    for synth, days in ((defaults, 30), (custom, 14)):
        groups = synth.resources("AWS::Logs::LogGroup")
        assert {g["Properties"]["RetentionInDays"] for g in groups.values()} == {days}
        for function in (synth.safety.reaper, synth.safety.notifier):
            config = synth.json["Resources"][synth.logical_id(function)]["Properties"]["LoggingConfig"]
            assert config["LogGroup"]["Ref"] in groups


def test_no_custom_resources_or_extra_functions(defaults):
    """Custom resources hang on the local emulator and add Lambdas; the safety stack has none."""
    types = {resource["Type"] for resource in defaults.json["Resources"].values()}
    assert not [t for t in types if t.startswith("Custom::") or t == "AWS::CloudFormation::CustomResource"]
    assert len(defaults.resources("AWS::Lambda::Function")) == 2


@pytest.mark.parametrize(
    ("function", "meaning"),
    [
        ("reaper", "An expired instance may still be running."),
        ("notifier", "Some instance state notices were not sent."),
    ],
)
def test_each_function_has_an_errors_alarm_on_the_topic_that_says_what_was_left_undone(defaults, function, meaning):
    topic_ref = {"Ref": defaults.logical_id(defaults.safety.alerts_topic)}
    function_ref = {"Ref": defaults.logical_id(getattr(defaults.safety, function))}
    defaults.template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "Namespace": "AWS/Lambda",
            "MetricName": "Errors",
            "Dimensions": [{"Name": "FunctionName", "Value": function_ref}],
            "Threshold": 1,
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "AlarmActions": [topic_ref],
            "AlarmDescription": f"The training-infra {function} failed; see its log group. {meaning}",
        },
    )


def test_max_runtime_metric_alarm_notifies_the_topic(defaults):
    topic_ref = {"Ref": defaults.logical_id(defaults.safety.alerts_topic)}
    defaults.template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "Namespace": naming.METRIC_NAMESPACE,
            "MetricName": "InstancesTerminatedForMaxRuntime",
            "Statistic": "Sum",
            "Threshold": 1,
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "TreatMissingData": "notBreaching",
            "AlarmActions": [topic_ref],
        },
    )


def test_reaper_publishes_the_metric_the_alarm_watches():
    from training_infra.safety.runtime import reaper

    assert reaper.METRIC_NAME == "InstancesTerminatedForMaxRuntime"


# --- EventBridge notices -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("detail_type", "words"),
    [
        ("EC2 Spot Instance Interruption Warning", "Spot interruption warning: instance <detail-instance-id>"),
        ("EC2 Instance Rebalance Recommendation", "Spot rebalance recommendation: instance <detail-instance-id>"),
    ],
)
def test_spot_warnings_become_readable_notices_on_the_topic(defaults, detail_type, words):
    topic_ref = {"Ref": defaults.logical_id(defaults.safety.alerts_topic)}
    _, rule = defaults.one("AWS::Events::Rule", EventPattern={"detail-type": [detail_type], "source": ["aws.ec2"]})
    [target] = rule["Properties"]["Targets"]
    assert target["Arn"] == topic_ref
    assert target["InputTransformer"]["InputPathsMap"]["detail-instance-id"] == "$.detail.instance-id"
    assert words in target["InputTransformer"]["InputTemplate"]


def test_instance_state_changes_go_to_the_notifier_that_filters_managed_instances(defaults):
    notifier_arn = {"Fn::GetAtt": [defaults.logical_id(defaults.safety.notifier), "Arn"]}
    _, rule = defaults.one(
        "AWS::Events::Rule",
        EventPattern={
            "detail": {"state": ["running", "stopped", "terminated"]},
            "detail-type": ["EC2 Instance State-change Notification"],
            "source": ["aws.ec2"],
        },
    )
    assert [t["Arn"] for t in rule["Properties"]["Targets"]] == [notifier_arn]
    notifier_env = defaults.json["Resources"][defaults.logical_id(defaults.safety.notifier)]["Properties"]
    assert notifier_env["Environment"]["Variables"]["MANAGED_TAG"] == naming.TAG_MANAGED


def test_notifier_may_read_instances_but_not_change_them(defaults):
    actions = sorted(a for s in policy_of_role(defaults, defaults.safety.notifier) for a in as_list(s["Action"]))
    assert [a for a in actions if a.startswith("ec2:")] == ["ec2:DescribeInstances"]


# --- gates on the synthesized template ----------------------------------------------------------


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_cfn_lint_reports_nothing(custom):
    result = run_tool(str(VENV_BIN / "cfn-lint"), str(custom.path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_passes_with_only_commented_skips(custom):
    result = run_tool(
        str(VENV_BIN / "checkov"), "-f", str(custom.path), "--framework", "cloudformation",
        "--output", "json", "--skip-download",
    )  # fmt: skip
    report = json.loads(result.stdout)
    assert report["summary"]["failed"] == 0, [c["check_id"] for c in report["results"]["failed_checks"]]
    assert report["summary"]["passed"] > 0
    skipped = report["results"]["skipped_checks"]
    assert skipped, "the functions' documented skips should be visible to checkov"
    for check in skipped:
        assert len(check["check_result"].get("suppress_comment", "")) > 40, check["check_id"]
