"""The run table and the supervisor as deployed: retained records, the triggers, and least privilege."""

from __future__ import annotations

import pytest
from aws_cdk.assertions import Match

from training_infra import naming


@pytest.fixture(scope="module")
def storage(synth):
    return synth("full").stack(naming.STORAGE_STACK)


@pytest.fixture(scope="module")
def compute(synth):
    return synth("full").stack(naming.COMPUTE_STACK)


@pytest.fixture(scope="module")
def supervisor(compute):
    return compute.construct("Supervisor")


def _as_list(value):
    return value if isinstance(value, list) else [value]


def test_run_records_outlive_compute_cost_nothing_at_rest_and_can_be_restored(storage):
    storage.template.has_resource(
        "AWS::DynamoDB::Table",
        {
            "DeletionPolicy": "Retain",
            "UpdateReplacePolicy": "Retain",
            "Properties": Match.object_like(
                {
                    "BillingMode": "PAY_PER_REQUEST",
                    "DeletionProtectionEnabled": True,
                    "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
                    "SSESpecification": {"SSEEnabled": True},
                }
            ),
        },
    )
    assert naming.OUTPUT_RUN_TABLE in storage.json["Outputs"]


def test_run_table_indexes_serve_the_reconcile_and_newest_first_listing(storage):
    storage.template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "GlobalSecondaryIndexes": Match.array_with(
                [
                    Match.object_like(
                        {"IndexName": "Active", "KeySchema": [{"AttributeName": "active", "KeyType": "HASH"}]}
                    ),
                    Match.object_like(
                        {
                            "IndexName": "ByCreated",
                            "KeySchema": [
                                {"AttributeName": "kind", "KeyType": "HASH"},
                                {"AttributeName": "created_at", "KeyType": "RANGE"},
                            ],
                        }
                    ),
                ]
            )
        },
    )


def test_supervisor_reacts_to_instance_states_spot_warnings_and_a_one_minute_reconcile(compute, supervisor):
    function_arn = {"Fn::GetAtt": [compute.logical_id(supervisor.function.function), "Arn"]}
    compute.template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "source": ["aws.ec2"],
                "detail-type": ["EC2 Instance State-change Notification"],
                "detail": {"state": ["running", "stopping", "stopped", "shutting-down", "terminated"]},
            },
            "Targets": [Match.object_like({"Arn": function_arn})],
        },
    )
    compute.template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "source": ["aws.ec2"],
                "detail-type": ["EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation"],
            },
            "Targets": [Match.object_like({"Arn": function_arn})],
        },
    )
    compute.template.has_resource_properties(
        "AWS::Events::Rule",
        {"ScheduleExpression": "rate(1 minute)", "Targets": [Match.object_like({"Arn": function_arn})]},
    )


def test_supervisor_gets_the_table_bucket_and_tag_names_it_must_agree_on(compute, supervisor):
    env = compute.json["Resources"][compute.logical_id(supervisor.function.function)]["Properties"]["Environment"][
        "Variables"
    ]
    assert env["ATTEMPT_TAG"] == naming.TAG_ATTEMPT and env["STOP_TAG"] == naming.TAG_STOP
    assert env["RUN_ID_TAG"] == naming.TAG_RUN_ID and env["MANAGED_TAG"] == naming.TAG_MANAGED
    assert "Fn::ImportValue" in env["TABLE"] and "Fn::ImportValue" in env["OUTPUTS_BUCKET"]


def test_supervisor_launches_only_tagged_instances_from_managed_templates_and_passes_only_the_instance_role(
    compute, supervisor
):
    statements = {s["Sid"]: s for s in compute.role_statements(supervisor.function.role) if "Sid" in s}
    managed = {f"aws:ResourceTag/{naming.TAG_MANAGED}": "true"}
    assert statements["LaunchOnlyFromRunTemplates"]["Condition"] == {"StringEquals": managed}
    assert statements["LaunchOnlyTaggedInstances"]["Condition"] == {
        "StringEquals": {f"aws:RequestTag/{naming.TAG_MANAGED}": "true"}
    }
    assert statements["StopAndEndManagedInstances"]["Condition"] == {"StringEquals": managed}
    assert statements["DeleteFinishedRunTemplates"]["Condition"] == {"StringEquals": managed}
    assert statements["TagAtLaunch"]["Condition"] == {
        "StringEquals": {"ec2:CreateAction": ["CreateFleet", "RunInstances"]}
    }
    pass_role = statements["PassOnlyTheInstanceRole"]
    assert pass_role["Resource"] == {"Fn::GetAtt": [compute.logical_id(compute.construct("Compute").role), "Arn"]}
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}


def test_supervisor_may_read_spot_and_list_prices_for_price_caps(compute, supervisor):
    statements = compute.role_statements(supervisor.function.role)
    allowed = {action for statement in statements for action in _as_list(statement["Action"])}
    assert {"ec2:DescribeSpotPriceHistory", "pricing:GetProducts"} <= allowed
    (list_prices,) = [s for s in statements if "pricing:GetProducts" in _as_list(s["Action"])]
    assert _as_list(list_prices["Action"]) == ["pricing:GetProducts"] and list_prices["Resource"] == "*"


def test_supervisor_role_has_no_wildcard_action_and_star_only_for_describe(compute, supervisor):
    for statement in compute.role_statements(supervisor.function.role):
        actions = _as_list(statement["Action"])
        assert not any(a == "*" or a.endswith(":*") for a in actions), statement
        if statement["Resource"] == "*":
            assert all(
                a.startswith("ec2:Describe") or a in ("cloudwatch:GetMetricStatistics", "pricing:GetProducts")
                for a in actions
            ), statement


def test_the_monthly_limit_reaches_the_supervisor_and_launch(compute, supervisor):
    env = compute.json["Resources"][compute.logical_id(supervisor.function.function)]["Properties"]["Environment"][
        "Variables"
    ]
    assert env["MONTHLY_LIMIT_USD"] == "200"
    assert compute.json["Outputs"][naming.OUTPUT_MONTHLY_LIMIT_USD]["Value"] == "200"


def test_past_the_monthly_budget_aws_budgets_denies_the_supervisor_new_instances(compute, supervisor):
    deny_id = compute.logical_id(supervisor.deny_launches)
    deny = compute.json["Resources"][deny_id]["Properties"]["PolicyDocument"]["Statement"]
    assert deny == [{"Effect": "Deny", "Action": ["ec2:CreateFleet", "ec2:RunInstances"], "Resource": "*"}]
    _, action = compute.one("AWS::Budgets::BudgetsAction")
    props = action["Properties"]
    assert (props["ActionType"], props["NotificationType"], props["ApprovalModel"]) == (
        "APPLY_IAM_POLICY",
        "ACTUAL",
        "AUTOMATIC",
    )
    assert props["ActionThreshold"] == {"Type": "PERCENTAGE", "Value": 100}
    assert props["Definition"]["IamActionDefinition"] == {
        "PolicyArn": {"Ref": deny_id},
        "Roles": [{"Ref": compute.logical_id(supervisor.function.role)}],
    }
    assert "Fn::ImportValue" in props["BudgetName"], "the safety stack's monthly budget"
    trusts = [
        r["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]
        for r in compute.resources("AWS::IAM::Role").values()
    ]
    [executor] = [t for t in trusts if t["Principal"] == {"Service": "budgets.amazonaws.com"}]
    assert executor["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}
