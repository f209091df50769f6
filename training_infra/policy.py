"""Policy-gate acknowledgements in one shape, so each carries a reason a reviewer can read."""

from __future__ import annotations

from aws_cdk import Acknowledgment, CfnResource, Validations
from constructs import Construct


def acknowledge_nag(scope: Construct, finding: str, reason: str) -> None:
    """Accept one cdk-nag AwsSolutions finding (e.g. `IAM5[Resource::*]`) on the narrowest scope."""
    Validations.of(scope).acknowledge(Acknowledgment(id=f"AwsSolutions::AwsSolutions-{finding}", reason=reason))


def skip_checkov(scope: Construct, check_id: str, comment: str) -> None:
    """Write a checkov skip with its reason into the resource's template metadata."""
    resource = scope if isinstance(scope, CfnResource) else scope.node.default_child
    assert isinstance(resource, CfnResource), f"{scope.node.path} has no CloudFormation resource"
    existing = resource.get_metadata("checkov") or {"skip": []}
    existing["skip"].append({"id": check_id, "comment": comment})
    resource.add_metadata("checkov", existing)
