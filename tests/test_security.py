"""Issue 15 on the compute stack: what the training container, the instance role and the network can reach.

Template assertions through the shared session synth (tests/conftest.py): "defaults" (cdk.json as
shipped) and "full" (which also turns the opt-in trainer role on).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from aws_cdk.assertions import Match

from training_infra import naming
from training_infra.compute.construct import SESSION_CHANNEL_ACTIONS, SSM_AGENT_MESSAGE_ACTIONS


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _compute(synthesized):
    view = synthesized.stack(naming.COMPUTE_STACK)
    view.compute = view.construct("Compute")
    return view


@pytest.fixture(scope="module")
def defaults(synth):
    return _compute(synth("defaults"))


@pytest.fixture(scope="module")
def full(synth):
    return _compute(synth("full"))


def launch_templates(view) -> list[dict]:
    return [
        resource["Properties"]["LaunchTemplateData"] for resource in view.resources("AWS::EC2::LaunchTemplate").values()
    ]


def actions_of(statements: list[dict]) -> set[str]:
    return {action for statement in statements for action in as_list(statement["Action"])}


# --- item 1: the container cannot reach the instance role -------------------------------------


@pytest.mark.parametrize("config", ["defaults", "full", "private", "on_demand"])
def test_every_launch_template_keeps_imds_one_hop_away_so_containers_cannot_read_the_instance_credentials(
    synth, config
):
    templates = launch_templates(_compute(synth(config)))
    assert templates
    for data in templates:
        assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
        assert data["MetadataOptions"]["HttpTokens"] == "required"


def test_instance_role_carries_no_managed_policy(defaults):
    role = defaults.json["Resources"][defaults.logical_id(defaults.compute.role)]
    assert "ManagedPolicyArns" not in role["Properties"]


def test_instance_role_reads_no_parameter_or_secret_itself_and_only_registers_with_ssm(defaults):
    statements = defaults.role_statements(defaults.compute.role)
    assert {a for a in actions_of(statements) if a.startswith(("ssm:", "secretsmanager:"))} == {
        "ssm:UpdateInstanceInformation"
    }


def test_session_manager_gets_exactly_its_channels_and_the_instance_registration(defaults):
    statements = defaults.role_statements(defaults.compute.role)
    channels = [
        s for s in statements if set(as_list(s["Action"])) & {*SESSION_CHANNEL_ACTIONS, *SSM_AGENT_MESSAGE_ACTIONS}
    ]
    assert len(channels) == 1
    assert set(channels[0]["Action"]) == {
        "ssmmessages:CreateControlChannel",
        "ssmmessages:CreateDataChannel",
        "ssmmessages:OpenControlChannel",
        "ssmmessages:OpenDataChannel",
        "ec2messages:AcknowledgeMessage",
        "ec2messages:DeleteMessage",
        "ec2messages:FailMessage",
        "ec2messages:GetEndpoint",
        "ec2messages:GetMessages",
        "ec2messages:SendReply",
    }
    [register] = [s for s in statements if "ssm:UpdateInstanceInformation" in as_list(s["Action"])]
    assert register["Resource"] == {
        "Fn::Join": [
            "",
            [
                "arn:",
                {"Ref": "AWS::Partition"},
                ":ec2:",
                {"Ref": "AWS::Region"},
                ":",
                {"Ref": "AWS::AccountId"},
                ":instance/*",
            ],
        ]
    }


def test_without_trainer_s3_access_the_instance_role_may_assume_only_the_secrets_reader(defaults):
    assert defaults.compute.trainer_role is None
    assumable = {
        json.dumps(s["Resource"])
        for s in defaults.role_statements(defaults.compute.role)
        if any(a.startswith("sts:") for a in as_list(s["Action"]))
    }
    assert assumable == {json.dumps({"Fn::GetAtt": [defaults.logical_id(defaults.compute.secrets_reader_role), "Arn"]})}
    assert naming.OUTPUT_TRAINER_ROLE_ARN not in defaults.json.get("Outputs", {})
    instance_role = {"Fn::GetAtt": [defaults.logical_id(defaults.compute.role), "Arn"]}
    assert [
        logical_id
        for logical_id, r in defaults.resources("AWS::IAM::Role").items()
        for s in r["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        if s["Principal"].get("AWS") == instance_role
    ] == [defaults.logical_id(defaults.compute.secrets_reader_role)], "only the secrets reader trusts it"


def test_opt_in_trainer_role_trusts_only_the_instance_role_with_the_run_id_session_tag_for_an_hour(full):
    trainer = full.json["Resources"][full.logical_id(full.compute.trainer_role)]["Properties"]
    assert trainer["MaxSessionDuration"] == 3600
    assert trainer["AssumeRolePolicyDocument"]["Statement"] == [
        {
            "Action": ["sts:AssumeRole", "sts:TagSession"],
            "Effect": "Allow",
            "Principal": {"AWS": {"Fn::GetAtt": [full.logical_id(full.compute.role), "Arn"]}},
            "Condition": {
                "StringLike": {f"aws:RequestTag/{naming.TAG_RUN_ID}": "?*"},
                "ForAllValues:StringEquals": {"aws:TagKeys": [naming.TAG_RUN_ID]},
            },
        }
    ]
    assert "ManagedPolicyArns" not in trainer


def test_instance_role_may_assume_and_tag_only_the_trainer_role_and_assume_the_secrets_reader(full):
    statements = [
        s for s in full.role_statements(full.compute.role) if any(a.startswith("sts:") for a in as_list(s["Action"]))
    ]
    assert statements == [
        {
            "Sid": "AssumeSecretsReaderRole",
            "Action": "sts:AssumeRole",
            "Effect": "Allow",
            "Resource": {"Fn::GetAtt": [full.logical_id(full.compute.secrets_reader_role), "Arn"]},
        },
        {
            "Sid": "AssumeTrainerRoleWithRunTag",
            "Action": ["sts:AssumeRole", "sts:TagSession"],
            "Effect": "Allow",
            "Resource": {"Fn::GetAtt": [full.logical_id(full.compute.trainer_role), "Arn"]},
        },
    ]


def test_trainer_role_reads_data_and_writes_only_its_own_runs_prefixes_by_session_tag(full):
    run = f"${{aws:PrincipalTag/{naming.TAG_RUN_ID}}}"
    statements = full.role_statements(full.compute.trainer_role)
    text = json.dumps(statements)
    assert actions_of(statements) == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"}
    writes = [s for s in statements if "s3:PutObject" in as_list(s["Action"])]
    assert len(writes) == 1
    suffixes = sorted(resource["Fn::Join"][1][-1] for resource in as_list(writes[0]["Resource"]))
    assert suffixes == [f"/checkpoints/{run}/*", f"/runs/{run}/*"]
    reads = [s for s in statements if as_list(s["Action"]) == ["s3:GetObject"]]
    assert [r["Resource"]["Fn::Join"][1][-1] for r in reads] == ["/data/*"]
    listed = [s["Condition"]["StringLike"]["s3:prefix"] for s in statements if s["Action"] == "s3:ListBucket"]
    assert sorted(map(tuple, listed)) == [("data/", "data/*"), (f"runs/{run}/*", f"checkpoints/{run}/*")]
    assert "runs/latest" not in text and "s3:DeleteObject" not in text


def test_trainer_role_arn_is_a_stack_output_for_the_agent(full):
    full.template.has_output(
        naming.OUTPUT_TRAINER_ROLE_ARN, {"Value": {"Fn::GetAtt": [full.logical_id(full.compute.trainer_role), "Arn"]}}
    )


# --- item 4: the reaper's second key is the instance profile ----------------------------------


@pytest.mark.parametrize("config", ["defaults", "full"])
def test_every_launch_template_launches_with_the_one_instance_profile_under_the_project_path(synth, config):
    view = _compute(synth(config))
    profile = view.logical_id(view.compute.instance_profile)
    view.template.has_resource_properties("AWS::IAM::InstanceProfile", {"Path": naming.INSTANCE_PROFILE_PATH})
    assert len(view.resources("AWS::IAM::InstanceProfile")) == 1
    for data in launch_templates(view):
        assert data["IamInstanceProfile"] == {"Arn": {"Fn::GetAtt": [profile, "Arn"]}}


# --- info items: KMS through SNS only, the S3 gateway endpoint -------------------------------


def test_instance_role_uses_the_alert_key_only_through_sns_for_the_alert_topic(full):
    statements = full.role_statements(full.compute.role)
    kms = [s for s in statements if any(a.startswith("kms:") for a in as_list(s["Action"]))]
    assert len(kms) == 1
    assert sorted(kms[0]["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey"]
    conditions = kms[0]["Condition"]["StringEquals"]
    assert conditions["kms:ViaService"] == {
        "Fn::Join": ["", ["sns.", {"Ref": "AWS::Region"}, ".", {"Ref": "AWS::URLSuffix"}]]
    }
    [publish] = [s for s in statements if s["Action"] == "sns:Publish"]
    assert conditions["kms:EncryptionContext:aws:sns:topicArn"] == publish["Resource"]


@pytest.mark.parametrize("config", ["defaults", "private"])
def test_s3_gateway_endpoint_reaches_only_this_accounts_buckets_and_ecr_layers(synth, config):
    view = _compute(synth(config))
    [(_, endpoint)] = [
        item
        for item in view.resources("AWS::EC2::VPCEndpoint").items()
        if item[1]["Properties"].get("VpcEndpointType") == "Gateway"
    ]
    statements = endpoint["Properties"]["PolicyDocument"]["Statement"]
    own, layers = statements
    assert own["Condition"] == {"StringEquals": {"aws:ResourceAccount": {"Ref": "AWS::AccountId"}}}
    assert not any("*" in action for action in as_list(own["Action"]))
    assert layers["Action"] == "s3:GetObject"
    assert layers["Resource"] == {
        "Fn::Join": [
            "",
            ["arn:", {"Ref": "AWS::Partition"}, ":s3:::prod-", {"Ref": "AWS::Region"}, "-starport-layer-bucket/*"],
        ]
    }
    assert "Condition" not in layers


def test_wildcard_actions_appear_only_in_denies_and_in_the_alert_keys_account_root_statement(synth):
    """What the README promises: no role or resource policy allows a `*` action, except the KMS key
    policy's default statement that keeps the key manageable by the account (kms:* for the root)."""
    for config in ("defaults", "full", "private"):
        for name, template in synth(config).templates.items():
            for logical_id, resource in template["Resources"].items():
                for statement in _statements_in(resource):
                    wild = [a for a in as_list(statement.get("Action", [])) if isinstance(a, str) and "*" in a]
                    if not wild or statement["Effect"] == "Deny":
                        continue
                    assert resource["Type"] == "AWS::KMS::Key" and wild == ["kms:*"], (
                        f"{config}/{name}/{logical_id}: {wild}"
                    )
                    assert statement["Principal"]["AWS"]["Fn::Join"][1][-1] == ":root"


def _statements_in(node):
    if isinstance(node, dict):
        if "Effect" in node and ("Action" in node or "NotAction" in node):
            yield node
        for value in node.values():
            yield from _statements_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from _statements_in(item)


@pytest.mark.parametrize("config", ["defaults", "private"])
def test_default_security_group_is_emptied_once_by_aws_runbook_with_a_role_limited_to_that_group(synth, config):
    view = _compute(synth(config))
    vpc = view.logical_id(view.compute.vpc)
    default_group = {"Fn::GetAtt": [vpc, "DefaultSecurityGroup"]}
    [association] = view.resources("AWS::SSM::Association").values()
    assert association["Properties"]["Name"] == "AWSConfigRemediation-RemoveVPCDefaultSecurityGroupRules"
    assert association["Properties"]["Parameters"]["GroupId"] == [default_group]
    [role_arn] = association["Properties"]["Parameters"]["AutomationAssumeRole"]
    role_id = role_arn["Fn::GetAtt"][0]
    role = view.json["Resources"][role_id]["Properties"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "ssm.amazonaws.com"}
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Condition"] == {
        "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    }
    statements = [
        s
        for policy in view.resources("AWS::IAM::Policy").values()
        if {"Ref": role_id} in policy["Properties"]["Roles"]
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
    ]
    [revoke] = [s for s in statements if "ec2:RevokeSecurityGroupIngress" in as_list(s["Action"])]
    assert sorted(revoke["Action"]) == ["ec2:RevokeSecurityGroupEgress", "ec2:RevokeSecurityGroupIngress"]
    assert revoke["Resource"]["Fn::Join"][1][-2:] == [":security-group/", default_group]
    custom = [
        r["Type"]
        for r in view.json["Resources"].values()
        if r["Type"].startswith("Custom::") or r["Type"] == "AWS::CloudFormation::CustomResource"
    ]
    assert custom == [], "no custom resource: the local AWS cannot run one"


def test_an_existing_vpcs_default_security_group_is_left_to_its_owner(synth):
    assert _compute(synth("existing_vpc")).resources("AWS::SSM::Association") == {}


def test_security_group_has_no_ingress_and_only_https_out(defaults):
    defaults.template.has_resource_properties(
        "AWS::EC2::SecurityGroup",
        {
            "GroupDescription": Match.string_like_regexp("Training instances"),
            "SecurityGroupIngress": Match.absent(),
            "SecurityGroupEgress": [
                Match.object_like({"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "CidrIp": "0.0.0.0/0"})
            ],
        },
    )


# --- info item: workflows that hold AWS credentials pin their actions ------------------------

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / ".github" / "workflows").glob("*.yml"))


def test_workflows_that_get_aws_credentials_pin_every_action_to_a_commit_sha_with_its_version():
    holding = [path for path in WORKFLOWS if "id-token: write" in path.read_text()]
    assert {path.name for path in holding} == {"cdk-diff.yml", "image.yml"}
    for path in holding:
        uses = re.findall(r"uses:\s*(\S+)(.*)", path.read_text())
        assert uses, path.name
        for action, comment in uses:
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", action), (
                f"{path.name}: {action} is not pinned to a commit"
            )
            assert re.fullmatch(r"\s+# v\d+(\.\d+)*", comment), f"{path.name}: {action} names no version"


def test_instance_role_reaches_secrets_only_by_assuming_the_secrets_reader_role(defaults):
    reader = defaults.compute.secrets_reader_role
    assumes = [s for s in defaults.role_statements(defaults.compute.role) if "sts:AssumeRole" in as_list(s["Action"])]
    assert [(s["Action"], s["Resource"]) for s in assumes] == [
        ("sts:AssumeRole", {"Fn::GetAtt": [defaults.logical_id(reader), "Arn"]})
    ], "defaults has no trainer role: the reader is the one role it may assume"


def test_secrets_reader_role_is_trusted_by_the_instance_role_only(defaults):
    reader = defaults.json["Resources"][defaults.logical_id(defaults.compute.secrets_reader_role)]
    assert reader["Properties"]["AssumeRolePolicyDocument"]["Statement"] == [
        {
            "Action": "sts:AssumeRole",
            "Effect": "Allow",
            "Principal": {"AWS": {"Fn::GetAtt": [defaults.logical_id(defaults.compute.role), "Arn"]}},
        }
    ]
    assert "ManagedPolicyArns" not in reader["Properties"]


def test_secrets_reader_role_reads_the_parameter_path_secrets_tagged_managed_and_decrypts_only_through_them(defaults):
    statements = {s["Sid"]: s for s in defaults.role_statements(defaults.compute.secrets_reader_role)}
    assert set(statements) == {
        "ReadTrainerSecretParameters",
        "ReadTrainerSecretsTaggedManaged",
        "DecryptThroughSsmAndSecretsManagerOnly",
    }
    parameters = statements["ReadTrainerSecretParameters"]
    assert parameters["Action"] == "ssm:GetParameter"
    assert json.dumps(parameters["Resource"]).endswith(':parameter/training-infra/*"]]}'), parameters["Resource"]
    secrets = statements["ReadTrainerSecretsTaggedManaged"]
    assert secrets["Action"] == "secretsmanager:GetSecretValue"
    assert secrets["Condition"] == {"StringEquals": {"secretsmanager:ResourceTag/training-infra:managed": "true"}}
    decrypt = statements["DecryptThroughSsmAndSecretsManagerOnly"]
    assert decrypt["Action"] == "kms:Decrypt"
    services = decrypt["Condition"]["StringEquals"]["kms:ViaService"]
    assert [json.dumps(service) for service in services] == [
        json.dumps({"Fn::Join": ["", [f"{service}.", {"Ref": "AWS::Region"}, ".", {"Ref": "AWS::URLSuffix"}]]})
        for service in ("ssm", "secretsmanager")
    ]
