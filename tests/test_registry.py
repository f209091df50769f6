"""ECR and the GitHub OIDC roles: images pushed from exactly one repository and branch, never with keys."""

from __future__ import annotations

import json

import pytest

from training_infra import naming

STACK = naming.REGISTRY_STACK
AUD = "token.actions.githubusercontent.com:aud"
SUB = "token.actions.githubusercontent.com:sub"


@pytest.fixture(scope="module")
def full(synth):
    return synth("full")


def _role(synthed, prefix: str) -> dict:
    (role,) = [r for key, r in synthed.resources(STACK, "AWS::IAM::Role").items() if key.startswith(prefix)]
    return role


def _policy_of(synthed, role_prefix: str) -> list[dict]:
    policies = [
        p
        for p in synthed.resources(STACK, "AWS::IAM::Policy").values()
        if any(r["Ref"].startswith(role_prefix) for r in p["Properties"]["Roles"])
    ]
    return [statement for policy in policies for statement in policy["Properties"]["PolicyDocument"]["Statement"]]


def test_repository_scans_on_push_keeps_sha_tags_immutable_and_expires_old_images(full):
    (repo,) = full.resources(STACK, "AWS::ECR::Repository").values()
    props = repo["Properties"]
    assert props["RepositoryName"] == "training-infra"
    assert props["ImageScanningConfiguration"] == {"ScanOnPush": True}
    assert props["ImageTagMutability"] == "IMMUTABLE_WITH_EXCLUSION"
    assert props["ImageTagMutabilityExclusionFilters"] == [
        {"ImageTagMutabilityExclusionFilterType": "WILDCARD", "ImageTagMutabilityExclusionFilterValue": tag}
        for tag in ("latest", "latest-soci")  # the SOCI-enabled image follows main too (issue 29)
    ]
    policy = json.loads(props["LifecyclePolicy"]["LifecyclePolicyText"])
    selections = [rule["selection"] for rule in policy["rules"]]
    assert {
        "tagStatus": "untagged",
        "countType": "sinceImagePushed",
        "countNumber": 1,
        "countUnit": "days",
    } in selections
    assert any(s["countType"] == "imageCountMoreThan" for s in selections)
    assert repo["DeletionPolicy"] == "Retain"


def test_oidc_provider_trusts_github_for_sts_only(full):
    (provider,) = full.resources(STACK, "AWS::IAM::OIDCProvider").values()
    assert provider["Properties"]["Url"] == "https://token.actions.githubusercontent.com"
    assert provider["Properties"]["ClientIdList"] == ["sts.amazonaws.com"]


def test_push_role_trusts_exactly_the_configured_repository_and_branch_for_one_hour(full):
    role = _role(full, "RegistryGithubPushRole")
    (statement,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert statement["Condition"] == {
        "StringEquals": {AUD: "sts.amazonaws.com", SUB: "repo:acme/trainer:ref:refs/heads/release"}
    }
    assert "StringLike" not in statement["Condition"], "no wildcard subject"
    assert role["Properties"]["MaxSessionDuration"] == 3600


def test_push_role_may_only_push_to_this_repository(full):
    statements = _policy_of(full, "RegistryGithubPushRole")
    for statement in statements:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all(a.startswith("ecr:") and a != "ecr:*" for a in actions)
        if statement["Resource"] == "*":
            assert actions == ["ecr:GetAuthorizationToken"]
        else:
            assert statement["Resource"]["Fn::GetAtt"][0].startswith("RegistryRepository")
    pushed = {a for s in statements for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])}
    assert {"ecr:PutImage", "ecr:CompleteLayerUpload", "ecr:UploadLayerPart", "ecr:InitiateLayerUpload"} <= pushed


def test_diff_role_is_for_pull_requests_and_only_reads_this_projects_stacks_assuming_no_other_role(full):
    """Issue 15, item 2: no bootstrap lookup role (ReadOnlyAccess: every bucket's data) behind the PR role."""
    role = _role(full, "RegistryGithubDiffRole")
    (statement,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert statement["Condition"]["StringEquals"][SUB] == "repo:acme/trainer:pull_request"
    (policy,) = _policy_of(full, "RegistryGithubDiffRole")
    assert policy["Action"] == [
        "cloudformation:DescribeStacks",
        "cloudformation:GetTemplate",
        "cloudformation:ListStackResources",
    ]
    assert policy["Resource"]["Fn::Join"][1][-1] == f":stack/{naming.STACK_PREFIX}-*/*"


def test_outputs_carry_the_seed_names(full):
    outputs = full.templates[STACK]["Outputs"]
    assert {
        naming.OUTPUT_ECR_REPOSITORY_URI,
        naming.OUTPUT_GITHUB_ACTIONS_ROLE_ARN,
        naming.OUTPUT_GITHUB_DIFF_ROLE_ARN,
    } <= set(outputs)
    assert naming.snake_case(naming.OUTPUT_GITHUB_ACTIONS_ROLE_ARN) == "github_actions_role_arn"


def test_without_a_repository_no_github_trust_exists_at_all(synth):
    defaults = synth("defaults")
    assert defaults.resources(STACK, "AWS::IAM::OIDCProvider") == {}
    assert defaults.resources(STACK, "AWS::IAM::Role") == {}
    assert naming.OUTPUT_GITHUB_ACTIONS_ROLE_ARN not in defaults.templates[STACK].get("Outputs", {})


def test_existing_oidc_provider_is_imported_not_created(synth):
    existing = synth("existing_oidc")
    assert existing.resources(STACK, "AWS::IAM::OIDCProvider") == {}
    role = _role(existing, "RegistryGithubPushRole")
    (statement,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert (
        statement["Principal"]["Federated"]
        == "arn:aws:iam::123456789012:oidc-provider/token.actions.githubusercontent.com"
    )
