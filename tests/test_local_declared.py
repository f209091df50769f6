"""The sandbox's gate after deploy (training_infra/local/declared.py) against one moto server, on small stacks
made through moto's CloudFormation as `cdk deploy` makes the project's: what it applies, what it names as a
mismatch, what it says it did not check."""

from __future__ import annotations

import json

import pytest

from training_infra.local.declared import check_declared
from training_infra.local.emulator import Emulator
from training_infra.local.instance import aws_client

TEMPLATE = {
    "Resources": {
        "Outputs": {
            "Type": "AWS::S3::Bucket",
            "Properties": {
                "VersioningConfiguration": {"Status": "Enabled"},
                "PublicAccessBlockConfiguration": {
                    "BlockPublicAcls": True, "BlockPublicPolicy": True,
                    "IgnorePublicAcls": True, "RestrictPublicBuckets": True,
                },
            },
        },
        "Runs": {
            "Type": "AWS::DynamoDB::Table",
            "Properties": {
                "BillingMode": "PAY_PER_REQUEST",
                "KeySchema": [{"AttributeName": "run_id", "KeyType": "HASH"}],
                "AttributeDefinitions": [{"AttributeName": "run_id", "AttributeType": "S"}],
                "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
            },
        },
        "Budget": {
            "Type": "AWS::Budgets::Budget",
            "Properties": {"Budget": {"BudgetType": "COST", "TimeUnit": "MONTHLY",
                                      "BudgetLimit": {"Amount": 100, "Unit": "USD"}}},
        },
    }
}  # fmt: skip


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("moto-declared")) as emulator:
        yield emulator


def deploy(aws, name: str) -> None:
    cloudformation = aws_client("cloudformation", aws.env)
    cloudformation.create_stack(StackName=name, TemplateBody=json.dumps(TEMPLATE))
    cloudformation.get_waiter("stack_create_complete").wait(StackName=name, WaiterConfig={"Delay": 1})


def physical(aws, stack: str, logical: str) -> str:
    return aws_client("cloudformation", aws.env).describe_stack_resource(StackName=stack, LogicalResourceId=logical)[
        "StackResourceDetail"
    ]["PhysicalResourceId"]


def client_for(aws):
    return lambda service: aws_client(service, aws.env)


def test_what_moto_skipped_is_applied_and_match_is_said_only_when_everything_checked_matched(aws):
    deploy(aws, "Matches")

    result = check_declared(client_for(aws), stacks=("Matches",))

    assert result.ok
    lines = result.lines()
    assert lines[0].startswith("applied what moto's CloudFormation skipped: versioning x1")
    assert lines[-1] == (
        "match: 2 resources of 2 kinds hold what the stacks declare "
        "(literal properties; IAM by statement count, security groups by rule count)"
    )
    bucket = physical(aws, "Matches", "Outputs")
    assert aws_client("s3", aws.env).get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"


def test_a_difference_nothing_applies_is_one_mismatch_line_and_no_match(aws):
    deploy(aws, "Differs")
    table = physical(aws, "Differs", "Runs")
    aws_client("dynamodb", aws.env).update_table(
        TableName=table, BillingMode="PROVISIONED",
        ProvisionedThroughput={"ReadCapacityUnits": 1, "WriteCapacityUnits": 1},
    )  # fmt: skip

    result = check_declared(client_for(aws), stacks=("Differs",))

    assert not result.ok
    assert [line for line in result.lines() if line.startswith("mismatch:")] == [
        'mismatch: Differs/Runs (AWS::DynamoDB::Table) billing mode: declared "PAY_PER_REQUEST", held "PROVISIONED"'
    ]
    assert not any(line.startswith("match") for line in result.lines())


def test_a_resource_moto_did_not_create_is_named_not_checked_with_why(aws):
    deploy(aws, "Skips")

    lines = check_declared(client_for(aws), stacks=("Skips",)).lines()

    assert (
        "not checked: 1 AWS::Budgets::Budget: moto's CloudFormation keeps no budget (template assertions prove it)"
        in lines
    )


def test_a_rule_cdk_declares_as_its_own_ingress_resource_counts_for_its_group():
    from training_infra.local.declared import standalone_ingress

    resources = {
        "Group": {"Type": "AWS::EC2::SecurityGroup", "Properties": {"SecurityGroupIngress": []}},
        "Self": {
            "Type": "AWS::EC2::SecurityGroupIngress",
            "Properties": {
                "GroupId": {"Fn::GetAtt": ["Group", "GroupId"]},
                "IpProtocol": "-1",
                "SourceSecurityGroupId": {"Fn::GetAtt": ["Group", "GroupId"]},
            },
        },  # fmt: skip
        "Other": {"Type": "AWS::EC2::SecurityGroupIngress", "Properties": {"GroupId": {"Ref": "Else"}}},
    }
    found = standalone_ingress(resources)
    assert [rule["IpProtocol"] for rule in found["Group"]] == ["-1"]
    assert set(found) == {"Group", "Else"}
