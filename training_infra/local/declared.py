"""What the stacks declare against what the local AWS holds after `cdk deploy` (the sandbox's gate).

moto's CloudFormation reports CREATE_COMPLETE for resources it skipped in part (an outputs bucket
without its declared versioning) or not at all (a budget). `check_declared` reads each stack's
template and, resource by resource, asks the emulator's own API for what it holds:
- a property the project relies on that moto skipped is applied (bucket versioning, default
  encryption) and said in one line;
- every other difference is one `mismatch:` line (the sandbox refuses to start on any);
- a resource moto did not create, or a kind no API here can describe, is `not checked: <why>`;
- `match` only when everything checked matched.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from training_infra import naming

STACKS = (naming.STORAGE_STACK, naming.REGISTRY_STACK, naming.SAFETY_STACK, naming.COMPUTE_STACK)
# Kinds moto's CloudFormation accepts without keeping anything an API here can read back.
NOT_HELD = {
    "AWS::CDK::Metadata": "the CDK's own metadata, no AWS resource",
    "AWS::Budgets::Budget": "moto's CloudFormation keeps no budget (template assertions prove it)",
    "AWS::Lambda::Function": "moto keeps no function here; the sandbox runs the handler's code in process",
    "AWS::Lambda::EventInvokeConfig": "moto keeps no function to configure (the sandbox plays the retries)",
    "AWS::Lambda::Permission": "moto keeps no function to permit",
    "AWS::SSM::Association": "no SSM agent runs locally",
    "AWS::EC2::Route": "moto's routes have no id to read back",
    "AWS::EC2::SubnetRouteTableAssociation": "moto's associations have no id to read back",
    "AWS::EC2::VPCGatewayAttachment": "moto's attachments have no id to read back",
    "AWS::IAM::OIDCProvider": "moto's CloudFormation keeps no OIDC provider",
    "AWS::SNS::TopicPolicy": "moto's topic attributes do not return it",
}


# What "match" means, said with it: literal properties compared; values built from Ref/Fn:: are not, IAM
# policies by statement count and security groups by rule count (moto returns no more to compare).
COMPARED = "(literal properties; IAM by statement count, security groups by rule count)"


class NotChecked(Exception):  # noqa: N818 - a reason, not a failure
    """This resource cannot be compared here; the message says why."""


@dataclass
class DeclaredCheck:
    """The result: lines to print, and whether the sandbox may start."""

    checked: int = 0
    kinds: set[str] = field(default_factory=set)
    applied: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    not_checked: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def lines(self) -> list[str]:
        found = []
        if self.applied:
            counted = Counter(self.applied)
            what = ", ".join(f"{name} x{count}" for name, count in counted.items())
            found.append(f"applied what moto's CloudFormation skipped: {what}")
        found += [f"mismatch: {line}" for line in self.mismatches]
        found += [f"not checked: {count} {kind}: {why}" for (kind, why), count in sorted(self.not_checked.items())]
        if self.ok:
            found.append(
                f"match: {self.checked} resources of {len(self.kinds)} kinds hold what the stacks declare {COMPARED}"
            )
        return found


Checker = Callable[[Callable[[str], Any], str, dict[str, Any], dict[str, str]], list[str]]


def check_declared(client: Callable[[str], Any], stacks: tuple[str, ...] = STACKS) -> DeclaredCheck:
    """`client(service)` gives a boto3 client for the emulator."""
    result = DeclaredCheck()
    cloudformation = client("cloudformation")
    for stack in stacks:
        body = cloudformation.get_template(StackName=stack)["TemplateBody"]
        template = json.loads(body) if isinstance(body, str) else body
        physical = {
            r["LogicalResourceId"]: r.get("PhysicalResourceId", "")
            for page in cloudformation.get_paginator("list_stack_resources").paginate(StackName=stack)
            for r in page["StackResourceSummaries"]
        }
        standalone = standalone_ingress(template.get("Resources", {}))
        for logical, resource in template.get("Resources", {}).items():
            kind, properties = resource.get("Type", ""), resource.get("Properties", {}) or {}
            if logical in standalone:
                properties = {**properties, "SecurityGroupIngress": [
                    *properties.get("SecurityGroupIngress", []), *standalone[logical]]}  # fmt: skip
            if kind in NOT_HELD:
                result.not_checked[(kind, NOT_HELD[kind])] += 1
                continue
            checker = CHECKERS.get(kind)
            if checker is None:
                result.not_checked[(kind, "no comparison written for this kind")] += 1
                continue
            if not physical.get(logical):
                result.not_checked[(kind, "moto's CloudFormation did not create it")] += 1
                continue
            try:
                differences = checker(client, physical[logical], properties, physical)
            except NotChecked as why:
                result.not_checked[(kind, str(why))] += 1
                continue
            except ClientError as error:
                if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
                    operation = getattr(error, "operation_name", "its describe call")
                    result.not_checked[(kind, f"moto fails {operation} on what its CloudFormation made")] += 1
                    continue
                result.mismatches.append(f"{stack}/{logical} ({kind}): declared, not held: {error}")
                continue
            except BotoCoreError as error:
                result.mismatches.append(f"{stack}/{logical} ({kind}): declared, not held: {error}")
                continue
            result.applied += [d.removeprefix("applied ") for d in differences if d.startswith("applied ")]
            for unchecked in [d.removeprefix("unchecked ") for d in differences if d.startswith("unchecked ")]:
                result.not_checked[(f"{kind} {unchecked.split(':')[0]}", unchecked.split(": ", 1)[1])] += 1
            result.mismatches += [
                f"{stack}/{logical} ({kind}) {d}" for d in differences if not d.startswith(("applied ", "unchecked "))
            ]
            result.checked += 1
            result.kinds.add(kind)
    return result


def standalone_ingress(resources: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each group's rules declared as their own AWS::EC2::SecurityGroupIngress (what CDK makes for a rule whose
    source is a group, such as the gang's self rule from `allow_internally`): EC2 holds them in the group's
    IpPermissions like its inline ones."""
    found: dict[str, list[dict[str, Any]]] = {}
    for resource in resources.values():
        if resource.get("Type") != "AWS::EC2::SecurityGroupIngress":
            continue
        properties = resource.get("Properties", {}) or {}
        group = properties.get("GroupId")
        if isinstance(group, dict) and "Fn::GetAtt" in group:
            found.setdefault(group["Fn::GetAtt"][0], []).append(properties)
        elif isinstance(group, dict) and "Ref" in group:
            found.setdefault(group["Ref"], []).append(properties)
    return found


def _literal(value: Any) -> bool:
    """A value the template states itself (not a Ref or Fn:: the emulator resolved)."""
    if isinstance(value, dict):
        return not any(key == "Ref" or key.startswith("Fn::") for key in value) and all(
            _literal(v) for v in value.values()
        )
    if isinstance(value, list):
        return all(_literal(v) for v in value)
    return True


def _differ(what: str, declared: Any, held: Any) -> list[str]:
    if declared is None or not _literal(declared) or declared == held:
        return []
    return [f"{what}: declared {json.dumps(declared)}, held {json.dumps(held, default=str)}"]


def _held_or_applied(what: str, declared: Any, read: Callable[[], Any], write: Callable[[], Any]) -> list[str]:
    """Compare; if the emulator skipped it, apply the declared value through its API and compare again."""
    if declared is None or not _literal(declared) or read() == declared:
        return []
    write()
    return [f"applied {what}", *_differ(what, declared, read())]


def _lifecycle_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """A CloudFormation lifecycle rule as S3's PutBucketLifecycleConfiguration takes it."""
    api: dict[str, Any] = {"ID": rule["Id"], "Status": rule["Status"], "Filter": {"Prefix": rule.get("Prefix", "")}}
    if "ExpirationInDays" in rule:
        api["Expiration"] = {"Days": rule["ExpirationInDays"]}
    if "NoncurrentVersionExpiration" in rule:
        api["NoncurrentVersionExpiration"] = {"NoncurrentDays": rule["NoncurrentVersionExpiration"]["NoncurrentDays"]}
    if "AbortIncompleteMultipartUpload" in rule:
        api["AbortIncompleteMultipartUpload"] = rule["AbortIncompleteMultipartUpload"]
    if "Transitions" in rule:
        api["Transitions"] = [
            {"Days": t["TransitionInDays"], "StorageClass": t["StorageClass"]} for t in rule["Transitions"]
        ]
    return api


# ------------------------------------------------------------------------------------------ S3


def _bucket(client: Callable[[str], Any], name: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    s3, found = client("s3"), []
    s3.head_bucket(Bucket=name)
    declared = (props.get("VersioningConfiguration") or {}).get("Status")
    if declared and s3.get_bucket_versioning(Bucket=name).get("Status") != declared:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": declared})
        found.append("applied versioning")
    found += _differ("versioning", declared, s3.get_bucket_versioning(Bucket=name).get("Status"))
    rules = (props.get("BucketEncryption") or {}).get("ServerSideEncryptionConfiguration")
    if rules:
        if not _encryption(s3, name):
            s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": rules})
            found.append("applied encryption")
        held = [r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for r in _encryption(s3, name)]
        declared_algorithms = [r.get("ServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for r in rules]
        found += _differ("default encryption", declared_algorithms, held)
    block = props.get("PublicAccessBlockConfiguration")
    if block:

        def held_block() -> dict[str, Any]:
            try:
                held = s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"]
            except ClientError:
                held = {}
            return {k: held.get(k) for k in block}

        found += _held_or_applied(
            "public access block", block, held_block,
            lambda: s3.put_public_access_block(Bucket=name, PublicAccessBlockConfiguration=block),
        )  # fmt: skip
    lifecycle = (props.get("LifecycleConfiguration") or {}).get("Rules")
    if lifecycle:

        def held_rules() -> list[str]:
            try:
                return sorted(r["ID"] for r in s3.get_bucket_lifecycle_configuration(Bucket=name)["Rules"])
            except ClientError:
                return []

        found += _held_or_applied(
            "lifecycle rules", sorted(r["Id"] for r in lifecycle), held_rules,
            lambda: s3.put_bucket_lifecycle_configuration(
                Bucket=name, LifecycleConfiguration={"Rules": [_lifecycle_rule(r) for r in lifecycle]}
            ),
        )  # fmt: skip
    return found


def _encryption(s3: Any, bucket: str) -> list[dict[str, Any]]:
    try:
        return s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    except ClientError:
        return []


def _bucket_policy(
    client: Callable[[str], Any], name: str, props: dict[str, Any], physical: dict[str, str]
) -> list[str]:
    bucket = props.get("Bucket")
    bucket = physical.get(bucket["Ref"], "") if isinstance(bucket, dict) and "Ref" in bucket else name
    held = json.loads(client("s3").get_bucket_policy(Bucket=bucket)["Policy"])
    declared = props.get("PolicyDocument", {}).get("Statement", [])
    return _differ("policy statements", len(declared), len(held.get("Statement", [])))


# ------------------------------------------------------------------------------------------ data, images, keys


def _table(client: Callable[[str], Any], name: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    dynamodb = client("dynamodb")
    table = dynamodb.describe_table(TableName=name)["Table"]
    found = _differ("key schema", props.get("KeySchema"), table.get("KeySchema"))
    found += _differ(
        "billing mode", props.get("BillingMode"), (table.get("BillingModeSummary") or {}).get("BillingMode")
    )
    if (props.get("SSESpecification") or {}).get("SSEEnabled") and not table.get("SSEDescription"):
        # moto's DynamoDB keeps no SSE setting from CloudFormation and ignores UpdateTable's.
        found.append("unchecked encryption: moto's DynamoDB keeps no SSE setting (template assertions prove it)")
    if (props.get("PointInTimeRecoverySpecification") or {}).get("PointInTimeRecoveryEnabled"):

        def held_recovery() -> str | None:
            backups = dynamodb.describe_continuous_backups(TableName=name)["ContinuousBackupsDescription"]
            return (backups.get("PointInTimeRecoveryDescription") or {}).get("PointInTimeRecoveryStatus")

        found += _held_or_applied(
            "point-in-time recovery", "ENABLED", held_recovery,
            lambda: dynamodb.update_continuous_backups(
                TableName=name, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
            ),
        )  # fmt: skip
    ttl = props.get("TimeToLiveSpecification")
    if ttl and ttl.get("Enabled"):
        held = dynamodb.describe_time_to_live(TableName=name)["TimeToLiveDescription"].get("AttributeName")
        found += _differ("time to live attribute", ttl.get("AttributeName"), held)
    return found


def _repository(client: Callable[[str], Any], name: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    ecr = client("ecr")

    def held() -> dict[str, Any]:
        return ecr.describe_repositories(repositoryNames=[name])["repositories"][0]

    repository = held()
    found = _differ("tag mutability", props.get("ImageTagMutability"), repository.get("imageTagMutability"))
    scan = (props.get("ImageScanningConfiguration") or {}).get("ScanOnPush")
    found += _held_or_applied(
        "scan on push", scan, lambda: held().get("imageScanningConfiguration", {}).get("scanOnPush"),
        lambda: ecr.put_image_scanning_configuration(
            repositoryName=name, imageScanningConfiguration={"scanOnPush": scan}
        ),
    )  # fmt: skip
    encryption = (props.get("EncryptionConfiguration") or {}).get("EncryptionType")
    found += _differ("encryption", encryption, repository.get("encryptionConfiguration", {}).get("encryptionType"))
    return found


def _key(client: Callable[[str], Any], key_id: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    kms = client("kms")
    metadata = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    found = _differ("enabled", props.get("Enabled", True), metadata.get("Enabled"))
    if props.get("EnableKeyRotation"):
        found += _differ("rotation", True, kms.get_key_rotation_status(KeyId=key_id).get("KeyRotationEnabled"))
    return found


def _topic(client: Callable[[str], Any], arn: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    attributes = client("sns").get_topic_attributes(TopicArn=arn)["Attributes"]
    if props.get("KmsMasterKeyId"):
        return _differ("encryption key", "set", "set" if attributes.get("KmsMasterKeyId") else "none")
    return []


def _log_group(client: Callable[[str], Any], name: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    groups = client("logs").describe_log_groups(logGroupNamePrefix=name)["logGroups"]
    held = next((g for g in groups if g["logGroupName"] == name), None)
    if held is None:
        return [f"log group {name}: declared, not held"]
    found = _differ("retention days", props.get("RetentionInDays"), held.get("retentionInDays"))
    if props.get("KmsKeyId"):
        found += _differ("encryption key", "set", "set" if held.get("kmsKeyId") else "none")
    return found


# ------------------------------------------------------------------------------------------ IAM


def _role(client: Callable[[str], Any], name: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    role = client("iam").get_role(RoleName=name)["Role"]
    declared = props.get("AssumeRolePolicyDocument", {}).get("Statement", [])
    held = role.get("AssumeRolePolicyDocument", {})
    held = json.loads(held) if isinstance(held, str) else held
    found = _differ("trust statements", len(declared), len(held.get("Statement", [])))
    return found + _differ("max session seconds", props.get("MaxSessionDuration"), role.get("MaxSessionDuration"))


def _policy(client: Callable[[str], Any], name: str, props: dict[str, Any], physical: dict[str, str]) -> list[str]:
    iam, found = client("iam"), []
    for role in props.get("Roles", []):
        if not (isinstance(role, dict) and role.get("Ref") in physical):
            raise NotChecked("a policy on a role outside its stack")
        role_name = physical[role["Ref"]]
        document = iam.get_role_policy(RoleName=role_name, PolicyName=props.get("PolicyName", name))["PolicyDocument"]
        document = json.loads(document) if isinstance(document, str) else document
        declared = props.get("PolicyDocument", {}).get("Statement", [])
        found += _differ(f"statements on {role_name}", len(declared), len(document.get("Statement", [])))
    return found


def _managed_policy(client: Callable[[str], Any], arn: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    iam = client("iam")
    policy = iam.get_policy(PolicyArn=arn)["Policy"]
    document = iam.get_policy_version(PolicyArn=arn, VersionId=policy["DefaultVersionId"])["PolicyVersion"]["Document"]
    document = json.loads(document) if isinstance(document, str) else document
    declared = props.get("PolicyDocument", {}).get("Statement", [])
    return _differ("statements", len(declared), len(document.get("Statement", [])))


def _instance_profile(client: Callable[[str], Any], name: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    profile = client("iam").get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    return _differ("roles", len(props.get("Roles", [])), len(profile.get("Roles", [])))


# ------------------------------------------------------------------------------------------ events, alarms


def _rule(client: Callable[[str], Any], name: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    rule = client("events").describe_rule(Name=name.rsplit("|", 1)[-1])
    pattern = props.get("EventPattern")
    held = json.loads(rule["EventPattern"]) if rule.get("EventPattern") else None
    found = _differ("event pattern", pattern, held) if pattern else []
    found += _differ("schedule", props.get("ScheduleExpression"), rule.get("ScheduleExpression"))
    return found + _differ("state", props.get("State"), rule.get("State"))


def _alarm(client: Callable[[str], Any], name: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    alarms = client("cloudwatch").describe_alarms(AlarmNames=[name])["MetricAlarms"]
    if not alarms:
        return [f"alarm {name}: declared, not held"]
    (alarm,) = alarms
    found = []
    for key in ("MetricName", "Namespace", "ComparisonOperator", "EvaluationPeriods", "Statistic"):
        found += _differ(key, props.get(key), alarm.get(key))
    if props.get("Threshold") is not None:
        found += _differ("Threshold", float(props["Threshold"]), alarm.get("Threshold"))
    return found


# ------------------------------------------------------------------------------------------ network, compute


def _describe(method: str, key: str, ids: str) -> Checker:
    def check(client: Callable[[str], Any], physical_id: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
        held = getattr(client("ec2"), method)(**{ids: [physical_id]})[key]
        return [] if held else [f"{physical_id}: declared, not held"]

    return check


def _vpc(client: Callable[[str], Any], vpc_id: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    (vpc,) = client("ec2").describe_vpcs(VpcIds=[vpc_id])["Vpcs"]
    return _differ("CIDR block", props.get("CidrBlock"), vpc.get("CidrBlock"))


def _subnet(client: Callable[[str], Any], subnet_id: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    ec2 = client("ec2")

    def held() -> dict[str, Any]:
        return ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"][0]

    found = _differ("CIDR block", props.get("CidrBlock"), held().get("CidrBlock"))
    public = props.get("MapPublicIpOnLaunch")
    return found + _held_or_applied(
        "public IP on launch", public, lambda: held().get("MapPublicIpOnLaunch"),
        lambda: ec2.modify_subnet_attribute(SubnetId=subnet_id, MapPublicIpOnLaunch={"Value": public}),
    )  # fmt: skip


def _security_group(client: Callable[[str], Any], group_id: str, props: dict[str, Any], _: dict[str, str]) -> list[str]:
    (group,) = client("ec2").describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    return _differ("ingress rules", len(props.get("SecurityGroupIngress", [])), len(group.get("IpPermissions", [])))


def _launch_template(
    client: Callable[[str], Any], template_id: str, props: dict[str, Any], _: dict[str, str]
) -> list[str]:
    versions = client("ec2").describe_launch_template_versions(LaunchTemplateId=template_id, Versions=["$Latest"])
    held = versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    declared = props.get("LaunchTemplateData", {})
    found = _differ(
        "IMDS tokens",
        (declared.get("MetadataOptions") or {}).get("HttpTokens"),
        (held.get("MetadataOptions") or {}).get("HttpTokens"),
    )
    found += _differ(
        "shutdown behaviour",
        declared.get("InstanceInitiatedShutdownBehavior"),
        held.get("InstanceInitiatedShutdownBehavior"),
    )
    return found + _differ("instance type", declared.get("InstanceType"), held.get("InstanceType"))


CHECKERS: dict[str, Checker] = {
    "AWS::S3::Bucket": _bucket,
    "AWS::S3::BucketPolicy": _bucket_policy,
    "AWS::DynamoDB::Table": _table,
    "AWS::ECR::Repository": _repository,
    "AWS::KMS::Key": _key,
    "AWS::SNS::Topic": _topic,
    "AWS::Logs::LogGroup": _log_group,
    "AWS::IAM::Role": _role,
    "AWS::IAM::Policy": _policy,
    "AWS::IAM::InstanceProfile": _instance_profile,
    "AWS::IAM::ManagedPolicy": _managed_policy,
    "AWS::Events::Rule": _rule,
    "AWS::CloudWatch::Alarm": _alarm,
    "AWS::EC2::VPC": _vpc,
    "AWS::EC2::Subnet": _subnet,
    "AWS::EC2::SecurityGroup": _security_group,
    "AWS::EC2::LaunchTemplate": _launch_template,
    "AWS::EC2::RouteTable": _describe("describe_route_tables", "RouteTables", "RouteTableIds"),
    "AWS::EC2::InternetGateway": _describe("describe_internet_gateways", "InternetGateways", "InternetGatewayIds"),
    "AWS::EC2::VPCEndpoint": _describe("describe_vpc_endpoints", "VpcEndpoints", "VpcEndpointIds"),
    "AWS::EC2::FlowLog": _describe("describe_flow_logs", "FlowLogs", "FlowLogIds"),
}
