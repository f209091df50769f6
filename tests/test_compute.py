"""The compute stack: no ingress, least privilege, IMDSv2, encrypted disks, spot exactly when asked.

Every resource is found through the construct that made it (`view.compute.launch_template`,
`.role`, `.instance`, ...) and every cross-stack value through the export its own stack made, so
no test holds a generated CloudFormation name. One synth per configuration (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from aws_cdk import Fn
from aws_cdk.assertions import Match, Matcher, Template

from tests.conftest import AMI, CDK_JSON_CONTEXT, CONFIGURATIONS
from training_infra import naming
from training_infra.cli.launching import template_exports
from training_infra.compute.construct import SESSION_CHANNEL_ACTIONS, SSM_AGENT_MESSAGE_ACTIONS
from training_infra.compute.user_data import AGENT_PACKAGE, OVERRIDES_MARKER, pack_agent

STACK = naming.COMPUTE_STACK
EVERY_NETWORK = ["defaults", "full", "on_demand", "existing_vpc", "private"]
LAUNCH_TEMPLATE = "AWS::EC2::LaunchTemplate"
IMAGE_PARAMETER = "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
# The alarm action that terminates the instance the alarm watches (CloudWatch's own ARN, not a generated name).
EC2_TERMINATE_ACTION = {
    "Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, ":automate:", {"Ref": "AWS::Region"}, ":ec2:terminate"]]
}


@pytest.fixture(scope="module")
def compute(synth):
    """`compute("full")` -> the compute stack of that configuration, its construct at `.compute`."""
    views = {}

    def get(name: str):
        if name not in views:
            synthesized = synth(name)
            view = synthesized.stack(STACK)
            view.compute = view.construct("Compute")
            view.outdir = synthesized.outdir
            view.storage = synthesized.stack(naming.STORAGE_STACK)
            view.registry = synthesized.stack(naming.REGISTRY_STACK)
            view.safety = synthesized.stack(naming.SAFETY_STACK)
            views[name] = view
        return views[name]

    return get


# --- helpers ---------------------------------------------------------------------------------


def has_properties(view, construct, properties: dict) -> None:
    """`construct`'s own resource matches `properties` (Template's deep partial match).

    Narrowed to that one resource, so a sibling of the same type (the endpoints' security group,
    the flow-log group) can never be the match.
    """
    logical_id = view.logical_id(construct)
    resource = view.json["Resources"][logical_id]
    Template.from_json({"Resources": {logical_id: resource}}).has_resource_properties(resource["Type"], properties)


def properties_of(view, construct) -> dict:
    return view.json["Resources"][view.logical_id(construct)]["Properties"]


def imported(producer, construct, attribute: str | None = None) -> dict:
    """How the compute stack reads `construct` of another stack: the import of the export made of it there."""
    value = {"Fn::GetAtt": [producer.logical_id(construct), attribute]} if attribute else producer.ref(construct)
    exports = producer.template.find_outputs("*", {"Value": value, "Export": Match.any_value()})
    assert len(exports) == 1, f"expected one export of {value} in {producer.stack.stack_name}, found {len(exports)}"
    (output,) = exports.values()
    return {"Fn::ImportValue": output["Export"]["Name"]}


def objects_under(bucket_arn: dict, prefix: str) -> dict:
    return {"Fn::Join": ["", [bucket_arn, f"/{prefix}*"]]}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def permissions(statements: list[dict]) -> list[dict]:
    """Statements as effect, actions, resources and condition, in a stable order; Sids and ordering do not count."""

    def canonical(statement: dict) -> dict:
        return {
            "Effect": statement["Effect"],
            "Action": sorted(as_list(statement["Action"])),
            "Resource": sorted(as_list(statement["Resource"]), key=lambda r: json.dumps(r, sort_keys=True)),
            "Condition": statement.get("Condition"),
        }

    return sorted((canonical(s) for s in statements), key=lambda s: json.dumps(s, sort_keys=True))


def allow(actions: list[str], resources: list, condition: dict | None = None) -> dict:
    return {"Effect": "Allow", "Action": actions, "Resource": resources, "Condition": condition}


def tags(pairs: dict[str, str]) -> Matcher:
    """These tags among others (CDK renders tags sorted by key)."""
    return Match.array_with([{"Key": key, "Value": value} for key, value in sorted(pairs.items())])


@dataclass(frozen=True)
class UserData:
    """A rendered user-data script: its text, with each CloudFormation token as a placeholder."""

    text: str
    tokens: dict[str, dict]

    @classmethod
    def of(cls, base64_value: dict) -> UserData:
        joined = base64_value["Fn::Base64"]
        parts = [joined] if isinstance(joined, str) else joined["Fn::Join"][1]
        placeholders: dict[str, str] = {}  # one per distinct token
        tokens: dict[str, dict] = {}
        text = ""
        for part in parts:
            if isinstance(part, str):
                text += part
                continue
            key = json.dumps(part, sort_keys=True)
            if key not in placeholders:
                placeholders[key] = f"@token{len(placeholders)}@"
                tokens[placeholders[key]] = part
            text += placeholders[key]
        return cls(text=text, tokens=tokens)

    def exports(self) -> dict[str, object]:
        """The TI_* settings as the CLI's parser reads them; a value that is one token comes back as that token."""
        return {name: self.tokens.get(value, value) for name, value in template_exports(self.text).items()}

    def placeholder(self, token: dict) -> str:
        (placeholder,) = [name for name, value in self.tokens.items() if value == token]
        return placeholder

    def bootstrap_value(self, name: str) -> str:
        """`agent_bucket`, `agent_key` or `agent_sha256` as the bootstrap sets it (a token: its placeholder)."""
        return re.search(rf"^agent_{name}=(\S+)$", self.text, re.M)[1].strip("'")


def group_id(view, security_group) -> dict:
    return {"Fn::GetAtt": [view.logical_id(security_group), "GroupId"]}


def launch_data(view) -> dict:
    return properties_of(view, view.compute.launch_template)["LaunchTemplateData"]


# --- launch template ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", EVERY_NETWORK)
def test_launch_template_requires_imdsv2_with_one_hop_encrypts_its_only_disk_and_has_no_key_pair(compute, config):
    view = compute(config)
    templates = [t for t in (view.compute.launch_template, view.compute.run_launch_template) if t is not None]
    view.template.resource_count_is(LAUNCH_TEMPLATE, len(templates))  # the run's own one with create_instance
    for template in templates:
        _assert_secure_launch_template(view, template)


def _assert_secure_launch_template(view, template) -> None:
    has_properties(
        view,
        template,
        {
            "LaunchTemplateData": {
                "MetadataOptions": Match.exact(
                    # One hop: a container behind Docker's bridge cannot reach the instance's credentials.
                    {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "InstanceMetadataTags": "enabled"}
                ),
                "KeyName": Match.absent(),
                # A literal list: exactly one device, and it is encrypted, gp3 and deleted with the instance.
                "BlockDeviceMappings": [
                    {"Ebs": {"Encrypted": True, "DeleteOnTermination": True, "VolumeType": "gp3", "VolumeSize": 150}}
                ],
                "Monitoring": {"Enabled": True},
                "SecurityGroupIds": [group_id(view, view.compute.security_group)],
            }
        },
    )


def test_spot_options_exactly_when_use_spot_with_the_price_cap_when_set(compute):
    has_properties(
        compute("defaults"),
        compute("defaults").compute.launch_template,
        {
            "LaunchTemplateData": {
                "InstanceMarketOptions": Match.exact(
                    {
                        "MarketType": "spot",
                        "SpotOptions": {"InstanceInterruptionBehavior": "terminate", "SpotInstanceType": "one-time"},
                    }
                )
            }
        },
    )
    on_demand = compute("on_demand")
    has_properties(
        on_demand, on_demand.compute.launch_template, {"LaunchTemplateData": {"InstanceMarketOptions": Match.absent()}}
    )
    capped = compute("private")
    has_properties(
        capped,
        capped.compute.launch_template,
        {
            "LaunchTemplateData": {
                "InstanceMarketOptions": {"SpotOptions": {"MaxPrice": CONFIGURATIONS["private"]["spot_max_price"]}}
            }
        },
    )


def test_power_off_terminates_with_auto_shutdown_and_stops_without(compute):
    for config, behaviour in (("defaults", "terminate"), ("on_demand", "stop")):
        view = compute(config)
        has_properties(
            view, view.compute.launch_template, {"LaunchTemplateData": {"InstanceInitiatedShutdownBehavior": behaviour}}
        )


def test_ami_comes_from_the_deep_learning_ami_parameter_unless_an_image_id_is_pinned(compute):
    defaults = compute("defaults")
    parameters = defaults.template.find_parameters(
        "*", {"Type": IMAGE_PARAMETER, "Default": Match.string_like_regexp("^/aws/service/deeplearning/ami/x86_64/")}
    )
    assert len(parameters) == 1, parameters
    (parameter,) = parameters
    has_properties(defaults, defaults.compute.launch_template, {"LaunchTemplateData": {"ImageId": {"Ref": parameter}}})

    pinned = compute("full")
    assert pinned.template.find_parameters("*", {"Type": IMAGE_PARAMETER}) == {}
    has_properties(pinned, pinned.compute.launch_template, {"LaunchTemplateData": {"ImageId": AMI}})


def test_launch_template_tags_instances_and_volumes_as_managed_with_the_run_id_and_configured_max_runtime(compute):
    full = compute("full")
    expected = tags(
        {
            naming.TAG_MANAGED: "true",
            naming.TAG_RUN_ID: CONFIGURATIONS["full"]["run_id"],
            naming.TAG_MAX_RUNTIME_HOURS: CONFIGURATIONS["full"]["max_runtime_hours"],
        }
    )
    has_properties(
        full,
        full.compute.launch_template,
        {
            "LaunchTemplateData": {
                "TagSpecifications": Match.array_with(
                    [{"ResourceType": "instance", "Tags": expected}, {"ResourceType": "volume", "Tags": expected}]
                )
            }
        },
    )


# --- user data: the agent and its settings -----------------------------------------------------


def test_user_data_boots_the_exact_agent_from_its_asset_with_a_place_for_run_overrides(compute):
    view = compute("full")
    script = UserData.of(launch_data(view)["UserData"])
    assert script.text.startswith("#!/bin/bash\n")
    assert OVERRIDES_MARKER in script.text
    asset = view.compute.agent_asset
    # The file cdk deploy uploads is the packed agent, byte for byte, and user data pins its sha256.
    staged = Path(view.outdir) / asset.asset_path
    assert staged.read_bytes() == pack_agent(), "the agent folder as user_data.pack_agent packs it"
    assert script.bootstrap_value("sha256") == hashlib.sha256(pack_agent()).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(staged.read_bytes()))) as packed:
        assert packed.extractfile("ti_agent/agent.py").read() == (AGENT_PACKAGE / "agent.py").read_bytes()
    assert script.tokens[script.bootstrap_value("bucket")] == view.stack.resolve(asset.s3_bucket_name)
    assert script.bootstrap_value("key") == asset.s3_object_key
    assert 'exec python3 -I "$unpacked"' in script.text


def test_instance_role_reads_the_packed_agents_of_the_asset_bucket_and_nothing_else_of_it(compute):
    """Every `<hash>.xz`, not only this deploy's: a run launched before a deploy that changed the agent
    relaunches with the agent its own template pins (its sha256 decides what runs)."""
    view = compute("defaults")
    asset = view.compute.agent_asset
    assert asset.s3_object_key.endswith(".xz"), "the pattern below must match the packed agent"
    reads = [s for s in view.role_statements(view.compute.role) if s.get("Sid") == "ReadTheAgent"]
    assert reads == [
        {
            "Sid": "ReadTheAgent",
            "Action": "s3:GetObject",
            "Effect": "Allow",
            "Resource": view.stack.resolve(asset.bucket.arn_for_objects("*.xz")),
        }
    ]


def test_user_data_gives_the_agent_the_configured_max_runtime_market_shutdown_and_data_access(compute):
    full = UserData.of(launch_data(compute("full"))["UserData"]).exports()
    max_runtime_seconds = int(float(CONFIGURATIONS["full"]["max_runtime_hours"]) * 3600)
    default_seconds = int(CDK_JSON_CONTEXT["max_runtime_hours"] * 3600)
    assert max_runtime_seconds != default_seconds, (
        "the full configuration must differ from the default to prove anything"
    )
    assert full["TI_MAX_RUNTIME_SECONDS"] == str(max_runtime_seconds)
    assert full["TI_MARKET"] == "spot"
    assert full["TI_AUTO_SHUTDOWN"] == "true"
    assert full["TI_DATA_ACCESS"] == "mount", "data_access reaches the agent (issue 29)"
    on_demand = UserData.of(launch_data(compute("on_demand"))["UserData"]).exports()
    assert on_demand["TI_DATA_ACCESS"] == "sync", "the default: today's full sync"
    assert on_demand["TI_MAX_RUNTIME_SECONDS"] == str(default_seconds)
    assert on_demand["TI_MARKET"] == "on-demand"
    assert on_demand["TI_AUTO_SHUTDOWN"] == "false"


def test_user_data_names_the_buckets_repository_log_group_and_topic_the_other_stacks_made(compute):
    view = compute("full")
    storage = view.storage.construct("Storage")
    script = UserData.of(launch_data(view)["UserData"])
    exports = script.exports()
    assert exports["TI_DATA_BUCKET"] == imported(view.storage, storage.data_bucket)
    assert exports["TI_OUTPUTS_BUCKET"] == imported(view.storage, storage.outputs_bucket)
    assert exports["TI_ALERTS_TOPIC_ARN"] == imported(view.safety, view.safety.construct("Safety").alerts_topic)
    assert exports["TI_LOG_GROUP"] == view.ref(view.compute.log_group)
    repository_name = imported(view.registry, view.registry.construct("Registry").repository)
    assert exports["TI_IMAGE_URI"].endswith("/" + script.placeholder(repository_name)), "the URI ends in the repository"


# --- instance role -------------------------------------------------------------------------------


def test_instance_role_has_no_wildcard_action_no_terminate_and_resource_star_only_where_unscopable(compute):
    view = compute("full")
    statements = view.role_statements(view.compute.role)
    actions = [action for statement in statements for action in as_list(statement["Action"])]
    assert actions, "the role has permissions"
    assert not [a for a in actions if a == "*" or a.endswith(":*")]
    assert "ec2:TerminateInstances" not in actions, "the box ends itself by powering off"
    for statement in statements:
        if statement["Resource"] == "*":
            assert set(as_list(statement["Action"])) <= {
                "ecr:GetAuthorizationToken", "cloudwatch:PutMetricData",
                *SESSION_CHANNEL_ACTIONS, *SSM_AGENT_MESSAGE_ACTIONS,
            }  # fmt: skip
    view.template.has_resource_properties(
        "AWS::IAM::Policy",
        {
            "Roles": [view.ref(view.compute.role)],
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Action": "cloudwatch:PutMetricData",
                                "Resource": "*",
                                "Condition": {"StringEquals": {"cloudwatch:namespace": naming.METRIC_NAMESPACE}},
                            }
                        )
                    ]
                )
            },
        },
    )


def test_instance_reads_data_writes_runs_and_checkpoints_reads_their_versions_deletes_latest_and_checkpoints(compute):
    view = compute("full")
    storage = view.storage.construct("Storage")
    data = imported(view.storage, storage.data_bucket, "Arn")
    outputs = imported(view.storage, storage.outputs_bucket, "Arn")
    s3_statements = [
        s
        for s in view.role_statements(view.compute.role)
        if any(a.startswith("s3:") for a in as_list(s["Action"])) and s.get("Sid") != "ReadTheAgent"
    ]  # the agent's own object: test_instance_role_reads_the_agent_object_and_nothing_else_of_the_asset_bucket
    assert permissions(s3_statements) == permissions(
        [
            allow(["s3:ListBucket"], [data], {"StringLike": {"s3:prefix": ["data/", "data/*"]}}),
            allow(["s3:GetObject"], [objects_under(data, "data/")]),
            allow(["s3:ListBucket"], [outputs], {"StringLike": {"s3:prefix": ["runs/*", "checkpoints/*"]}}),
            allow(
                ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
                [objects_under(outputs, "runs/"), objects_under(outputs, "checkpoints/")],
            ),
            allow(["s3:ListBucketVersions"], [outputs], {"StringLike": {"s3:prefix": ["checkpoints/*"]}}),
            allow(["s3:GetObjectVersion"], [objects_under(outputs, "checkpoints/")]),
            allow(
                ["s3:DeleteObject"], [objects_under(outputs, "runs/latest/"), objects_under(outputs, "checkpoints/")]
            ),
        ]
    )


def test_instance_pulls_only_its_repository_logs_only_to_its_group_and_publishes_only_to_the_alerts_topic(compute):
    view = compute("full")
    safety = view.safety.construct("Safety")
    topic = imported(view.safety, safety.alerts_topic)
    # Session Manager, the trainer secrets and the opt-in trainer role are asserted in tests/test_security.py.
    elsewhere = ("s3:", "ssm:", "ssmmessages:", "ec2messages:", "sts:", "secretsmanager:")
    other_statements = [
        s
        for s in view.role_statements(view.compute.role)
        if not any(a.startswith(elsewhere) for a in as_list(s["Action"]))
    ]
    assert permissions(other_statements) == permissions(
        [
            allow(
                ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
                [imported(view.registry, view.registry.construct("Registry").repository, "Arn")],
            ),
            allow(["ecr:GetAuthorizationToken"], ["*"]),
            allow(
                ["logs:CreateLogStream", "logs:PutLogEvents"],
                [{"Fn::GetAtt": [view.logical_id(view.compute.log_group), "Arn"]}],
            ),
            allow(["sns:Publish"], [topic]),
            # The topic is encrypted: publishing needs its key, only its key, only through SNS for that topic.
            allow(
                ["kms:Decrypt", "kms:GenerateDataKey"],
                [imported(view.safety, safety.alerts_key, "Arn")],
                {
                    "StringEquals": {
                        "kms:ViaService": {
                            "Fn::Join": ["", ["sns.", {"Ref": "AWS::Region"}, ".", {"Ref": "AWS::URLSuffix"}]]
                        },
                        "kms:EncryptionContext:aws:sns:topicArn": topic,
                    }
                },
            ),
            allow(
                ["cloudwatch:PutMetricData"], ["*"], {"StringEquals": {"cloudwatch:namespace": naming.METRIC_NAMESPACE}}
            ),
        ]
    )


def test_instance_role_is_for_ec2_and_holds_no_managed_policy(compute):
    view = compute("defaults")
    has_properties(
        view,
        view.compute.role,
        {
            "AssumeRolePolicyDocument": {
                "Statement": [
                    {"Action": "sts:AssumeRole", "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}}
                ]
            },
            # Not AmazonSSMManagedInstanceCore (ssm:GetParameter* on *): tests/test_security.py lists what replaces it.
            "ManagedPolicyArns": Match.absent(),
        },
    )


# --- network --------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", EVERY_NETWORK)
def test_no_security_group_has_ingress_and_instances_only_speak_https_out(compute, config):
    view = compute(config)
    view.template.all_resources_properties("AWS::EC2::SecurityGroup", {"SecurityGroupIngress": Match.absent()})
    has_properties(
        view,
        view.compute.security_group,
        {
            "SecurityGroupEgress": [
                Match.exact(
                    {
                        "CidrIp": "0.0.0.0/0",
                        "Description": "HTTPS to AWS APIs (S3, ECR, SSM, Logs)",
                        "FromPort": 443,
                        "IpProtocol": "tcp",
                        "ToPort": 443,
                    }
                )
            ]
        },
    )


def test_the_only_ingress_rule_is_https_from_instances_to_the_endpoints(compute):
    for config in EVERY_NETWORK:
        view = compute(config)
        ingress = view.resources("AWS::EC2::SecurityGroupIngress")
        assert all("CidrIp" not in r["Properties"] and "CidrIpv6" not in r["Properties"] for r in ingress.values()), (
            "nothing from outside a security group"
        )
        assert len(ingress) == (1 if config == "private" else 0), config
    view = compute("private")
    view.template.has_resource_properties(
        "AWS::EC2::SecurityGroupIngress",
        {
            "CidrIp": Match.absent(),
            "CidrIpv6": Match.absent(),
            "IpProtocol": "tcp",
            "FromPort": 443,
            "ToPort": 443,
            "GroupId": group_id(view, view.construct("Compute/EndpointSecurityGroup")),
            "SourceSecurityGroupId": group_id(view, view.compute.security_group),
        },
    )


@pytest.mark.parametrize("config", ["full", "private"])
def test_training_instances_cannot_reach_each_other_through_the_stacks_group(compute, config):
    """A gang's members meet only in their attempt's own group (the supervisor's, gang.py): the stack's instance group
    lets no run's instance reach another's (a single-node trainer, another team member's gang's c10d store)."""
    view = compute(config)
    group = group_id(view, view.compute.security_group)
    rules = [*view.resources("AWS::EC2::SecurityGroupIngress").values(),
             *view.resources("AWS::EC2::SecurityGroupEgress").values()]  # fmt: skip
    assert [r for r in rules if r["Properties"]["GroupId"] == group] == []
    assert all(r["Properties"]["IpProtocol"] != "-1" for r in rules), "no every-port rule anywhere in the stack"


def test_default_network_costs_nothing_at_rest(compute):
    view = compute("defaults")
    assert view.compute.instance is None
    view.template.resource_count_is("AWS::EC2::Instance", 0)
    view.template.resource_count_is("AWS::EC2::NatGateway", 0)
    # Only gateway endpoints (S3), which cost nothing; interface endpoints bill by the hour.
    view.template.all_resources_properties("AWS::EC2::VPCEndpoint", {"VpcEndpointType": "Gateway"})
    view.template.all_resources_properties("AWS::EC2::Subnet", {"MapPublicIpOnLaunch": True})


def test_explicit_availability_zones_get_one_subnet_each(compute):
    view = compute("full")
    zones = CONFIGURATIONS["full"]["availability_zones"].split(",")
    view.template.resource_count_is("AWS::EC2::Subnet", len(zones))
    for zone in zones:
        view.template.has_resource_properties("AWS::EC2::Subnet", {"AvailabilityZone": zone})


def test_private_networking_has_no_public_ip_and_reaches_aws_through_endpoints(compute):
    view = compute("private")
    view.template.all_resources_properties("AWS::EC2::Subnet", {"MapPublicIpOnLaunch": False})
    view.template.resource_count_is("AWS::EC2::InternetGateway", 0)
    view.template.resource_count_is("AWS::EC2::NatGateway", 0)
    endpoints = group_id(view, view.construct("Compute/EndpointSecurityGroup"))
    services = ["ssm", "ssmmessages", "ec2messages", "ecr.api", "ecr.dkr", "logs", "monitoring", "sns", "sts"]
    services += ["secretsmanager"]  # --secret and the trainer role reach STS and Secrets Manager too
    view.template.resource_properties_count_is("AWS::EC2::VPCEndpoint", {"VpcEndpointType": "Interface"}, len(services))
    for service in services:
        view.template.has_resource_properties(
            "AWS::EC2::VPCEndpoint",
            {
                "VpcEndpointType": "Interface",
                "ServiceName": {"Fn::Join": ["", ["com.amazonaws.", {"Ref": "AWS::Region"}, f".{service}"]]},
                "PrivateDnsEnabled": True,
                "SecurityGroupIds": [endpoints],
            },
        )


def test_existing_vpc_is_used_without_creating_a_network(compute):
    view = compute("existing_vpc")
    setting = CONFIGURATIONS["existing_vpc"]
    view.template.resource_count_is("AWS::EC2::VPC", 0)
    view.template.resource_count_is("AWS::EC2::Subnet", 0)
    has_properties(view, view.compute.security_group, {"VpcId": setting["vpc_id"]})
    has_properties(view, view.compute.instance, {"SubnetId": setting["subnet_ids"].split(",")[0]})
    view.template.has_output(naming.OUTPUT_SUBNET_IDS, {"Value": setting["subnet_ids"]})


# --- the instance of `create_instance` -------------------------------------------------------------


def test_created_instance_boots_version_1_of_its_runs_template_with_the_run_id_in_tags_and_user_data(compute):
    view = compute("full")
    instance = view.compute.instance
    run_id = CONFIGURATIONS["full"]["run_id"]
    has_properties(
        view,
        instance,
        {
            # Version 1 of the run's own template, not the latest: a later deploy never touches the instance.
            "LaunchTemplate": {"LaunchTemplateId": view.ref(view.compute.run_launch_template), "Version": "1"},
            "ImageId": Match.absent(),
            "UserData": Match.absent(),
            "SubnetId": view.stack.resolve(view.compute.subnet_ids[0]),
        },
    )
    run_data = properties_of(view, view.compute.run_launch_template)["LaunchTemplateData"]
    assert run_data["ImageId"] == AMI
    instance_tags = {
        t["Key"]: t["Value"]
        for spec in run_data["TagSpecifications"]
        if spec["ResourceType"] == "instance"
        for t in spec["Tags"]
    }
    assert instance_tags[naming.TAG_RUN_ID] == run_id and instance_tags["Name"] == naming.instance_name(run_id)
    assert instance_tags[naming.TAG_MANAGED] == "true"
    assert UserData.of(run_data["UserData"]).exports()["TI_RUN_ID"] == run_id
    view.template.has_output(naming.OUTPUT_INSTANCE_ID, {"Value": view.ref(instance)})
    assert compute("defaults").template.find_outputs(naming.OUTPUT_INSTANCE_ID) == {}


def test_instance_without_a_configured_run_id_boots_with_the_run_id_its_tags_carry(compute):
    view = compute("private")  # run_id unset: the shared template leaves it to the agent; the run's template names it
    assert UserData.of(launch_data(view)["UserData"]).exports()["TI_RUN_ID"] == ""
    run_data = properties_of(view, view.compute.run_launch_template)["LaunchTemplateData"]
    tag_run_id = {
        t["Key"]: t["Value"]
        for spec in run_data["TagSpecifications"]
        if spec["ResourceType"] == "instance"
        for t in spec["Tags"]
    }[naming.TAG_RUN_ID]
    assert tag_run_id
    assert UserData.of(run_data["UserData"]).exports()["TI_RUN_ID"] == tag_run_id


def test_a_new_run_id_gives_the_instance_a_new_logical_id_and_nothing_else_does(compute):
    """CloudFormation cannot see that the last instance terminated itself: a new run must be a new resource."""
    with_run_id = compute("full").logical_id(compute("full").compute.instance)
    without = {
        config: compute(config).logical_id(compute(config).compute.instance)
        for config in ("on_demand", "existing_vpc", "private")
    }
    assert len(set(without.values())) == 1, (
        f"market, network and price settings must not replace the instance: {without}"
    )
    assert with_run_id not in without.values()


def test_created_instance_has_idle_and_status_alarms_that_terminate_it_and_notify(compute):
    view = compute("full")
    instance = {"Name": "InstanceId", "Value": view.ref(view.compute.instance)}
    actions = [EC2_TERMINATE_ACTION, imported(view.safety, view.safety.construct("Safety").alerts_topic)]
    idle, status = view.compute.alarms
    has_properties(
        view,
        idle,
        {
            "Namespace": naming.METRIC_NAMESPACE,
            "MetricName": "GPUUtilization",
            "Dimensions": [instance],
            "Threshold": CDK_JSON_CONTEXT["idle_gpu_percent"],
            "ComparisonOperator": "LessThanThreshold",
            "TreatMissingData": "notBreaching",
            "AlarmActions": actions,
        },
    )
    idle_properties = properties_of(view, idle)
    assert idle_properties["Period"] * idle_properties["EvaluationPeriods"] == CDK_JSON_CONTEXT["idle_minutes"] * 60
    has_properties(
        view,
        status,
        {
            "Namespace": "AWS/EC2",
            "MetricName": "StatusCheckFailed",
            "Dimensions": [instance],
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "AlarmActions": actions,
        },
    )
    on_instances = [
        alarm
        for alarm in compute("defaults").resources("AWS::CloudWatch::Alarm").values()
        if any(d["Name"] == "InstanceId" for d in alarm["Properties"].get("Dimensions", []))
    ]
    assert on_instances == [], "no instance, no instance alarms"


# --- outputs and logs --------------------------------------------------------------------------------


def test_compute_outputs_let_the_cli_launch_into_the_subnets_and_read_logs(compute):
    view = compute("defaults")
    view.template.has_output(naming.OUTPUT_LAUNCH_TEMPLATE_ID, {"Value": view.ref(view.compute.launch_template)})
    view.template.has_output(naming.OUTPUT_LOG_GROUP_NAME, {"Value": view.ref(view.compute.log_group)})
    view.template.has_output(
        naming.OUTPUT_SUBNET_IDS, {"Value": view.stack.resolve(Fn.join(",", view.compute.subnet_ids))}
    )


def test_training_log_group_keeps_logs_for_the_configured_days(compute):
    configured = {
        "defaults": CDK_JSON_CONTEXT["log_retention_days"],
        "full": int(CONFIGURATIONS["full"]["log_retention_days"]),
    }
    assert len(set(configured.values())) == 2, "the two configurations must differ to prove the setting arrives"
    for config, days in configured.items():
        view = compute(config)
        has_properties(view, view.compute.log_group, {"RetentionInDays": days})
