"""Training images in ECR, pushed and diffed from GitHub Actions through OIDC: no static keys."""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from constructs import Construct

from training_infra import naming
from training_infra.policy import acknowledge_nag, nag_name, skip_checkov

GITHUB_OIDC_HOST = "token.actions.githubusercontent.com"
# GitHub's certificate thumbprints; IAM no longer checks them for this provider but still stores them.
GITHUB_THUMBPRINTS = ["6938fd4d98bab03faadb97b34396831e3780aea1", "1c58a3a8518e8759bf075b76b750d4f2df264fcd"]


@dataclass(frozen=True)
class RegistryProps:
    """The settings the registry reads (built from Settings in stacks.py)."""

    repository_name: str = "training-infra"
    github_repo: str = ""  # owner/name; empty: no OIDC provider and no GitHub roles
    github_branch: str = "main"
    existing_oidc_provider_arn: str = ""  # reuse the account's provider (one per URL)


class TrainingRegistry(Construct):
    """ECR repository plus the two GitHub roles: push images from one branch, read-only diff from pull requests.

    The repository's construct id is its logical id (tests/test_registry.py pins it): renaming it
    would replace the repository and its images.
    """

    def __init__(self, scope: Construct, construct_id: str, *, props: RegistryProps) -> None:
        super().__init__(scope, construct_id)
        self.repository = ecr.Repository(
            self,
            "Repository",
            # An outside system (the image workflow, moto) must know the name.
            repository_name=props.repository_name,
            image_scan_on_push=True,
            # Commit-SHA tags never move; only `latest` and its SOCI-enabled twin `latest-soci` (the image
            # workflow's lazy-loading index, docs/agent.md) follow main, so only they stay mutable.
            image_tag_mutability=ecr.TagMutability.IMMUTABLE_WITH_EXCLUSION,
            image_tag_mutability_exclusion_filters=[
                ecr.ImageTagMutabilityExclusionFilter.wildcard("latest"),
                ecr.ImageTagMutabilityExclusionFilter.wildcard("latest-soci"),
            ],
            encryption=ecr.RepositoryEncryption.AES_256,
            removal_policy=RemovalPolicy.RETAIN,
            lifecycle_rules=[
                ecr.LifecycleRule(
                    rule_priority=1,
                    description="Drop untagged layers after a day",
                    tag_status=ecr.TagStatus.UNTAGGED,
                    max_image_age=Duration.days(1),
                ),
                ecr.LifecycleRule(
                    rule_priority=2,
                    description="Keep the newest 50 images",
                    tag_status=ecr.TagStatus.ANY,
                    max_image_count=50,
                ),
            ],
        )
        skip_checkov(
            self.repository,
            "CKV_AWS_136",
            "AES-256 encryption at rest; a KMS key adds cost and key policy without protecting training images further",
        )
        skip_checkov(
            self.repository,
            "CKV_AWS_51",
            "Tags are immutable except `latest`, which the image workflow moves to the newest main build",
        )
        self.oidc_provider: iam.IOidcProvider | None = None
        self.push_role: iam.Role | None = None
        self.diff_role: iam.Role | None = None
        if props.github_repo:
            self._github_roles(props)

    def _github_roles(self, props: RegistryProps) -> None:
        if props.existing_oidc_provider_arn:
            # An account holds one provider per URL; reuse it when another stack made it.
            self.oidc_provider = iam.OidcProviderNative.from_oidc_provider_arn(
                self, "GithubOidcProvider", props.existing_oidc_provider_arn
            )
        else:
            self.oidc_provider = iam.OidcProviderNative(
                self,
                "GithubOidcProvider",
                url=f"https://{GITHUB_OIDC_HOST}",
                client_ids=["sts.amazonaws.com"],
                thumbprints=GITHUB_THUMBPRINTS,
            )

        def github_principal(subject: str) -> iam.WebIdentityPrincipal:
            return iam.WebIdentityPrincipal(
                self.oidc_provider.oidc_provider_arn,
                conditions={
                    "StringEquals": {
                        f"{GITHUB_OIDC_HOST}:aud": "sts.amazonaws.com",
                        f"{GITHUB_OIDC_HOST}:sub": subject,
                    }
                },
            )

        self.push_role = iam.Role(
            self,
            "GithubPushRole",
            description=f"GitHub Actions in {props.github_repo} on {props.github_branch}: push training images",
            assumed_by=github_principal(f"repo:{props.github_repo}:ref:refs/heads/{props.github_branch}"),
            max_session_duration=Duration.hours(1),
        )
        self.repository.grant_push(self.push_role)
        acknowledge_nag(
            self.push_role,
            "IAM5[Resource::*]",
            "ecr:GetAuthorizationToken has no resource type; pushes are limited to this repository",
        )

        self.diff_role = iam.Role(
            self,
            "GithubDiffRole",
            description=(
                f"GitHub Actions on pull requests of {props.github_repo}: read this project's stacks, for cdk diff"
            ),
            assumed_by=github_principal(f"repo:{props.github_repo}:pull_request"),
            max_session_duration=Duration.hours(1),
        )
        # cdk diff of this app needs no lookups: it reads the deployed templates with these
        # credentials alone. No bootstrap role to assume (the lookup role carries ReadOnlyAccess,
        # every bucket's objects included), and pull requests run their own code with this role.
        stack = Stack.of(self)
        project_stacks = (
            f"arn:{stack.partition}:cloudformation:{stack.region}:{stack.account}:stack/{naming.STACK_PREFIX}-*/*"
        )
        self.diff_role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadTrainingInfraStacks",
                actions=[
                    "cloudformation:DescribeStacks",
                    "cloudformation:GetTemplate",
                    "cloudformation:ListStackResources",
                ],
                resources=[project_stacks],
            )
        )
        acknowledge_nag(
            self.diff_role,
            f"IAM5[Resource::{nag_name(self, project_stacks)}]",
            "Read-only describe/get on this project's stacks; the stack ARN ends in a generated id",
        )
