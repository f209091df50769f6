"""Training images in ECR, pushed and diffed from GitHub Actions through OIDC: no static keys."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from constructs import Construct

from training_infra.config import Settings
from training_infra.policy import skip_checkov

GITHUB_OIDC_HOST = "token.actions.githubusercontent.com"
# GitHub's certificate thumbprints; IAM no longer checks them for this provider but still stores them.
GITHUB_THUMBPRINTS = ["6938fd4d98bab03faadb97b34396831e3780aea1", "1c58a3a8518e8759bf075b76b750d4f2df264fcd"]


class TrainingRegistry(Construct):
    """ECR repository plus the two GitHub roles: push images from one branch, read-only diff from pull requests."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id)
        self.repository = ecr.Repository(
            self,
            "Repository",
            # An outside system (the image workflow, moto) must know the name.
            repository_name=settings.ecr_repository_name,
            image_scan_on_push=True,
            # Commit-SHA tags never move; only `latest` follows main, so only it stays mutable.
            image_tag_mutability=ecr.TagMutability.IMMUTABLE_WITH_EXCLUSION,
            image_tag_mutability_exclusion_filters=[ecr.ImageTagMutabilityExclusionFilter.wildcard("latest")],
            encryption=ecr.RepositoryEncryption.AES_256,
            removal_policy=RemovalPolicy.RETAIN,
            lifecycle_rules=[
                ecr.LifecycleRule(rule_priority=1, description="Drop untagged layers after a day", tag_status=ecr.TagStatus.UNTAGGED, max_image_age=Duration.days(1)),
                ecr.LifecycleRule(rule_priority=2, description="Keep the newest 50 images", tag_status=ecr.TagStatus.ANY, max_image_count=50),
            ],
        )
        skip_checkov(self.repository, "CKV_AWS_136", "AES-256 encryption at rest; a KMS key adds cost and key policy without protecting training images further")
        skip_checkov(self.repository, "CKV_AWS_51", "Tags are immutable except `latest`, which the image workflow moves to the newest main build")
        self.oidc_provider: iam.IOidcProvider | None = None
        self.push_role: iam.Role | None = None
        self.diff_role: iam.Role | None = None
        if settings.github_enabled:
            self._github_roles(settings)

    def _github_roles(self, settings: Settings) -> None:
        if settings.existing_oidc_provider_arn:
            # An account holds one provider per URL; reuse it when another stack made it.
            self.oidc_provider = iam.OidcProviderNative.from_oidc_provider_arn(self, "GithubOidcProvider", settings.existing_oidc_provider_arn)
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
            description=f"GitHub Actions in {settings.github_repo} on {settings.github_branch}: push training images",
            assumed_by=github_principal(f"repo:{settings.github_repo}:ref:refs/heads/{settings.github_branch}"),
            max_session_duration=Duration.hours(1),
        )
        self.repository.grant_push(self.push_role)

        self.diff_role = iam.Role(
            self,
            "GithubDiffRole",
            description=f"GitHub Actions on pull requests of {settings.github_repo}: read-only, for cdk diff",
            assumed_by=github_principal(f"repo:{settings.github_repo}:pull_request"),
            max_session_duration=Duration.hours(1),
        )
        # cdk diff reads deployed templates through the bootstrap lookup role; it needs nothing that writes.
        stack = Stack.of(self)
        self.diff_role.add_to_policy(
            iam.PolicyStatement(
                sid="AssumeCdkLookupRole",
                actions=["sts:AssumeRole"],
                resources=[f"arn:{stack.partition}:iam::{stack.account}:role/cdk-hnb659fds-lookup-role-{stack.account}-{stack.region}"],
            )
        )
        self.diff_role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadTrainingInfraStacks",
                actions=["cloudformation:DescribeStacks", "cloudformation:GetTemplate", "cloudformation:ListStackResources"],
                resources=[f"arn:{stack.partition}:cloudformation:{stack.region}:{stack.account}:stack/TrainingInfra-*/*"],
            )
        )
