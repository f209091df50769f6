"""The compute stack: no ingress, least privilege, IMDSv2, encrypted disks, spot exactly when asked."""

from __future__ import annotations

import json

import pytest

from training_infra import naming
from training_infra.compute.user_data import OVERRIDES_MARKER

STACK = naming.COMPUTE_STACK


def _launch_data(synthed) -> dict:
    (template,) = synthed.resources(STACK, "AWS::EC2::LaunchTemplate").values()
    return template["Properties"]["LaunchTemplateData"]


def _role_statements(synthed) -> list[dict]:
    policies = synthed.resources(STACK, "AWS::IAM::Policy").values()
    return [s for p in policies if any(r["Ref"].startswith("ComputeInstanceRole") for r in p["Properties"]["Roles"]) for s in p["Properties"]["PolicyDocument"]["Statement"]]


def _actions(statement: dict) -> list[str]:
    return statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]


def _rendered(value) -> str:
    """Fn::Base64 of Fn::Join -> the script text, with tokens shown as {...}."""
    joined = value["Fn::Base64"]
    if isinstance(joined, str):
        return joined
    return "".join(part if isinstance(part, str) else json.dumps(part) for part in joined["Fn::Join"][1])


@pytest.mark.parametrize("config", ["defaults", "full", "on_demand", "existing_vpc", "private"])
def test_launch_template_requires_imdsv2_encrypts_disks_and_has_no_key_pair(synth, config):
    data = _launch_data(synth(config))
    assert data["MetadataOptions"] == {"HttpPutResponseHopLimit": 2, "HttpTokens": "required", "InstanceMetadataTags": "enabled"}
    assert "KeyName" not in data
    for device in data["BlockDeviceMappings"]:
        assert device["Ebs"]["Encrypted"] is True
        assert device["Ebs"]["DeleteOnTermination"] is True
        assert device["Ebs"]["VolumeType"] == "gp3"
    assert data["Monitoring"] == {"Enabled": True}


@pytest.mark.parametrize("config", ["defaults", "full", "on_demand", "existing_vpc", "private"])
def test_no_ingress_anywhere_and_instances_only_speak_https(synth, config):
    groups = synth(config).resources(STACK, "AWS::EC2::SecurityGroup")
    for key, group in groups.items():
        if key.startswith("ComputeInstanceSecurityGroup"):
            assert "SecurityGroupIngress" not in group["Properties"]
            assert group["Properties"]["SecurityGroupEgress"] == [
                {"CidrIp": "0.0.0.0/0", "Description": "HTTPS to AWS APIs (S3, ECR, SSM, Logs)", "FromPort": 443, "IpProtocol": "tcp", "ToPort": 443}
            ]
    for ingress in synth(config).resources(STACK, "AWS::EC2::SecurityGroupIngress").values():
        assert "CidrIp" not in ingress["Properties"], "endpoint ingress only from the instance security group"
        assert ingress["Properties"]["SourceSecurityGroupId"]["Fn::GetAtt"][0].startswith("ComputeInstanceSecurityGroup")


def test_spot_options_exactly_when_use_spot(synth):
    spot = _launch_data(synth("defaults"))
    assert spot["InstanceMarketOptions"] == {"MarketType": "spot", "SpotOptions": {"InstanceInterruptionBehavior": "terminate", "SpotInstanceType": "one-time"}}
    assert "InstanceMarketOptions" not in _launch_data(synth("on_demand"))
    capped = _launch_data(synth("private"))
    assert capped["InstanceMarketOptions"]["SpotOptions"]["MaxPrice"] == "0.5"


def test_power_off_terminates_with_auto_shutdown_and_stops_without(synth):
    assert _launch_data(synth("defaults"))["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert _launch_data(synth("on_demand"))["InstanceInitiatedShutdownBehavior"] == "stop"


def test_ami_comes_from_the_deep_learning_ami_parameter_unless_pinned(synth):
    defaults = synth("defaults").templates[STACK]
    image_parameters = [v for v in defaults["Parameters"].values() if v["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"]
    (parameter,) = image_parameters
    assert parameter["Default"].startswith("/aws/service/deeplearning/ami/x86_64/")
    assert _launch_data(synth("full"))["ImageId"] == "ami-0123456789abcdef0"


def test_launch_template_tags_instances_and_volumes_as_managed_with_the_run_id(synth):
    specs = {spec["ResourceType"]: {t["Key"]: t["Value"] for t in spec["Tags"]} for spec in _launch_data(synth("full"))["TagSpecifications"]}
    for resource in ("instance", "volume"):
        assert specs[resource][naming.TAG_MANAGED] == "true"
        assert specs[resource][naming.TAG_RUN_ID] == "bert-lr3e4"
        assert specs[resource][naming.TAG_MAX_RUNTIME_HOURS] == "12"


def test_user_data_is_the_agent_with_stack_values_and_a_place_for_run_overrides(synth):
    script = _rendered(_launch_data(synth("full"))["UserData"])
    assert script.startswith("#!/bin/bash")
    assert OVERRIDES_MARKER in script
    assert "export TI_MAX_RUNTIME_SECONDS=43200" in script
    assert "export TI_MARKET=spot" in script
    assert "export TI_AUTO_SHUTDOWN=true" in script
    assert "StorageDataBucket" in script and "StorageOutputsBucket" in script, "bucket names come from the storage stack"
    assert "exec bash" in script


def test_instance_role_has_no_wildcard_action_and_no_terminate(synth):
    statements = _role_statements(synth("full"))
    actions = [a for s in statements for a in _actions(s)]
    assert actions, "the role has permissions"
    assert not any(a == "*" or a.endswith(":*") for a in actions)
    assert "ec2:TerminateInstances" not in actions, "the box ends itself by powering off"
    for statement in statements:
        if statement["Resource"] == "*":
            assert set(_actions(statement)) <= {"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData"}
        if "cloudwatch:PutMetricData" in _actions(statement):
            assert statement["Condition"] == {"StringEquals": {"cloudwatch:namespace": "TrainingInfra"}}


def test_instance_reads_only_data_and_writes_only_runs_and_checkpoints(synth):
    statements = {s["Sid"]: s for s in _role_statements(synth("full")) if "Sid" in s}
    assert _actions(statements["ReadData"]) == ["s3:GetObject"]
    assert statements["ReadData"]["Resource"]["Fn::Join"][1][-1] == "/data/*"
    write = statements["ReadWriteRunsAndCheckpoints"]
    assert sorted(_actions(write)) == ["s3:AbortMultipartUpload", "s3:GetObject", "s3:PutObject"]
    assert sorted(r["Fn::Join"][1][-1] for r in write["Resource"]) == ["/checkpoints/*", "/runs/*"]
    assert _actions(statements["MirrorLatestRunAndCheckpoints"]) == ["s3:DeleteObject"]
    assert sorted(r["Fn::Join"][1][-1] for r in statements["MirrorLatestRunAndCheckpoints"]["Resource"]) == ["/checkpoints/*", "/runs/latest/*"]
    assert statements["ListDataPrefix"]["Condition"] == {"StringLike": {"s3:prefix": ["data/", "data/*"]}}


def test_instance_role_allows_session_manager(synth):
    (role,) = [r for k, r in synth("defaults").resources(STACK, "AWS::IAM::Role").items() if k.startswith("ComputeInstanceRole")]
    managed = json.dumps(role["Properties"]["ManagedPolicyArns"])
    assert "AmazonSSMManagedInstanceCore" in managed


def test_default_network_costs_nothing_at_rest(synth):
    defaults = synth("defaults")
    assert defaults.resources(STACK, "AWS::EC2::NatGateway") == {}
    assert all(e["Properties"].get("VpcEndpointType", "Gateway") == "Gateway" for e in defaults.resources(STACK, "AWS::EC2::VPCEndpoint").values())
    assert defaults.resources(STACK, "AWS::EC2::Instance") == {}
    subnets = defaults.resources(STACK, "AWS::EC2::Subnet").values()
    assert subnets and all(s["Properties"]["MapPublicIpOnLaunch"] for s in subnets)


def test_explicit_availability_zones_get_one_subnet_each(synth):
    zones = sorted(s["Properties"]["AvailabilityZone"] for s in synth("full").resources(STACK, "AWS::EC2::Subnet").values())
    assert zones == ["us-east-1a", "us-east-1b", "us-east-1c"]


def test_private_networking_has_no_public_ip_and_reaches_aws_through_endpoints(synth):
    private = synth("private")
    subnets = private.resources(STACK, "AWS::EC2::Subnet").values()
    assert all(not s["Properties"]["MapPublicIpOnLaunch"] for s in subnets)
    assert private.resources(STACK, "AWS::EC2::InternetGateway") == {}
    interface = [e for e in private.resources(STACK, "AWS::EC2::VPCEndpoint").values() if e["Properties"].get("VpcEndpointType") == "Interface"]
    services = {json.dumps(e["Properties"]["ServiceName"]) for e in interface}
    assert len(interface) == 8
    assert any("ssmmessages" in s for s in services) and any("ecr.dkr" in s for s in services)


def test_existing_vpc_is_used_without_creating_a_network(synth):
    existing = synth("existing_vpc")
    assert existing.resources(STACK, "AWS::EC2::VPC") == {}
    (group,) = [g for k, g in existing.resources(STACK, "AWS::EC2::SecurityGroup").items() if k.startswith("ComputeInstanceSecurityGroup")]
    assert group["Properties"]["VpcId"] == "vpc-0123456789abcdef0"
    (instance,) = existing.resources(STACK, "AWS::EC2::Instance").values()
    assert instance["Properties"]["SubnetId"] == "subnet-0123456789abcdef0"


def test_created_instance_uses_the_launch_template_and_its_run_id(synth):
    full = synth("full")
    (logical_id,) = full.resources(STACK, "AWS::EC2::Instance")
    instance = full.resources(STACK, "AWS::EC2::Instance")[logical_id]["Properties"]
    assert logical_id.startswith("ComputeInstanceBertLr3e4"), "a new run id gives a new instance"
    assert instance["LaunchTemplate"]["LaunchTemplateId"]["Ref"].startswith("ComputeLaunchTemplate")
    assert instance["ImageId"] == "ami-0123456789abcdef0"
    assert "export TI_RUN_ID=bert-lr3e4" in _rendered(instance["UserData"])
    assert {t["Key"]: t["Value"] for t in instance["Tags"]}[naming.TAG_RUN_ID] == "bert-lr3e4"
    assert naming.OUTPUT_INSTANCE_ID in full.templates[STACK]["Outputs"]
    assert naming.OUTPUT_INSTANCE_ID not in synth("defaults").templates[STACK]["Outputs"]


def test_created_instance_has_idle_and_status_alarms_that_terminate_and_notify(synth):
    alarms = synth("full").resources(STACK, "AWS::CloudWatch::Alarm")
    by_metric = {a["Properties"]["MetricName"]: a["Properties"] for a in alarms.values()}
    idle = by_metric["GPUUtilization"]
    assert idle["Namespace"] == "TrainingInfra" and idle["Threshold"] == 5
    assert idle["ComparisonOperator"] == "LessThanThreshold"
    assert idle["Period"] * idle["EvaluationPeriods"] == 30 * 60
    assert by_metric["StatusCheckFailed"]["Namespace"] == "AWS/EC2"
    for alarm in by_metric.values():
        rendered = json.dumps(alarm["AlarmActions"])
        assert ":ec2:terminate" in rendered and "AlertsTopic" in rendered


def test_compute_outputs_let_the_cli_launch_and_read_logs(synth):
    outputs = synth("defaults").templates[STACK]["Outputs"]
    assert {naming.OUTPUT_LAUNCH_TEMPLATE_ID, naming.OUTPUT_LOG_GROUP_NAME} <= set(outputs)


def test_training_log_group_keeps_logs_for_the_configured_days(synth):
    groups = synth("defaults").resources(STACK, "AWS::Logs::LogGroup")
    training = [g for k, g in groups.items() if k.startswith("ComputeTrainingLogs")][0]
    assert training["Properties"]["RetentionInDays"] == 30
