"""Helpers every construct shares: gate acknowledgements (each with a reason a reviewer can read)
and log retention from the settings' days."""

from __future__ import annotations

from typing import Any

from aws_cdk import Acknowledgment, CfnResource, Stack, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from constructs import Construct

from training_infra.config import LOG_RETENTION_NAMES


def acknowledge_nag(scope: Construct, finding: str, reason: str) -> None:
    """Accept one cdk-nag AwsSolutions finding (e.g. `IAM5[Resource::*]`) on the narrowest scope."""
    Validations.of(scope).acknowledge(Acknowledgment(id=f"AwsSolutions::AwsSolutions-{finding}", reason=reason))


def as_seen_from(consumer: Construct, producer: Construct, value: str) -> str:
    """`value` (an attribute of `producer`, e.g. a bucket ARN) as `consumer`'s stack will reference it.

    Across stacks that is an import of the very export CDK would create for the reference anyway,
    so a policy and the cdk-nag acknowledgement for it name the same thing (see `nag_name`).
    """
    home = Stack.of(producer)
    return home.export_value(value) if Stack.of(consumer) is not home else value


def nag_name(scope: Construct, value: str) -> str:
    """How cdk-nag writes `value` (an ARN, often with tokens) in a finding of a resource in `scope`'s stack.

    cdk-nag flattens the resolved CloudFormation: `Ref` -> `<Id>`, `GetAtt` -> `<Id.Attr>`, an import
    -> its export name, `Join` -> the joined parts. Naming findings this way keeps generated names out
    of the code: an acknowledgement follows the construct it is about.
    """
    return _flatten(Stack.of(scope).resolve(value))


def _flatten(node: Any) -> str:
    if isinstance(node, str):
        return node.replace("${", "<").replace("}", ">")
    if isinstance(node, dict) and "Fn::Join" in node:
        delimiter, items = node["Fn::Join"]
        return delimiter.join(_flatten(item) for item in items)
    if isinstance(node, dict) and "Fn::GetAtt" in node:
        resource, attribute = node["Fn::GetAtt"]
        return f"<{_flatten(resource)}.{_flatten(attribute)}>"
    if isinstance(node, dict) and "Fn::ImportValue" in node:
        return _flatten(node["Fn::ImportValue"])
    if isinstance(node, dict) and "Ref" in node:
        return f"<{_flatten(node['Ref'])}>"
    if isinstance(node, dict) and isinstance(node.get("Fn::Sub"), str):  # the bootstrap bucket's name
        return _flatten(node["Fn::Sub"])
    raise ValueError(f"cannot name {node!r} as cdk-nag would")


def skip_checkov(scope: Construct, check_id: str, comment: str) -> None:
    """Write a checkov skip with its reason into the resource's template metadata."""
    resource = scope if isinstance(scope, CfnResource) else scope.node.default_child
    assert isinstance(resource, CfnResource), f"{scope.node.path} has no CloudFormation resource"
    existing = resource.get_metadata("checkov") or {"skip": []}
    existing["skip"].append({"id": check_id, "comment": comment})
    resource.add_metadata("checkov", existing)


def skip_checkovs(scope: Construct, reasons: dict[str, str]) -> None:
    """Several checkov skips on one resource: check id -> reason."""
    for check_id, comment in reasons.items():
        skip_checkov(scope, check_id, comment)


# SNS names the topic in the encryption context of every data key it asks KMS for.
SNS_TOPIC_CONTEXT = "kms:EncryptionContext:aws:sns:topicArn"


def grant_encrypted_publish(grantee: iam.IGrantable, topic: sns.ITopic, key: kms.IKey | None) -> None:
    """sns:Publish on the topic, and its key's data-key calls only through SNS and only for that topic.

    `topic.grant_publish` would allow `kms:GenerateDataKey*` on the key for any use; this is what
    publishing to an encrypted topic needs (kms:GenerateDataKey and kms:Decrypt, through SNS).
    """
    grantee.grant_principal.add_to_principal_policy(
        iam.PolicyStatement(actions=["sns:Publish"], resources=[topic.topic_arn])
    )
    if key is None:
        return
    stack = Stack.of(topic)
    grantee.grant_principal.add_to_principal_policy(
        iam.PolicyStatement(
            actions=["kms:GenerateDataKey", "kms:Decrypt"],
            resources=[key.key_arn],
            conditions={
                "StringEquals": {
                    "kms:ViaService": f"sns.{stack.region}.{stack.url_suffix}",
                    SNS_TOPIC_CONTEXT: topic.topic_arn,
                }
            },
        )
    )


def log_retention(days: int) -> logs.RetentionDays:
    """Settings hold days; the L2 wants its enum (config already refused days CloudWatch lacks)."""
    return getattr(logs.RetentionDays, LOG_RETENTION_NAMES[days])
