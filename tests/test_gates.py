"""Policy gates on the real synthesized templates of every configuration that matters."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGURATIONS
from training_infra import naming

VENV_BIN = Path(sys.executable).parent

# Every cdk-nag finding the app accepts, with its reason in code. A new one must be added here on purpose.
# `{data}` / `{outputs}` / `{runs}`: the bucket or run-table ARN as the compute stack imports it
# (named through the construct).
ACKNOWLEDGED_NAG_FINDINGS = {
    "AwsSolutions-EC29",
    "AwsSolutions-IAM5[Resource::*]",
    "AwsSolutions-IAM5[Resource::{data}/data/*]",
    "AwsSolutions-IAM5[Resource::{outputs}/runs/*]",
    "AwsSolutions-IAM5[Resource::{outputs}/checkpoints/*]",
    "AwsSolutions-IAM5[Resource::{outputs}/runs/latest/*]",
    # The opt-in trainer role: its own run's prefixes, by the run-id session tag.
    "AwsSolutions-IAM5[Resource::{outputs}/runs/<aws:PrincipalTag/training-infra:run-id>/*]",
    "AwsSolutions-IAM5[Resource::{outputs}/checkpoints/<aws:PrincipalTag/training-infra:run-id>/*]",
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:cloudformation:<AWS::Region>:<AWS::AccountId>:stack/TrainingInfra-*/*]",
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:instance/*]",
    # TrainingUserPolicy: ending or resuming only the caller's own Session Manager sessions.
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ssm:<AWS::Region>:<AWS::AccountId>:session/<aws:userid>-*]",
    "AwsSolutions-S1",
    # The role of the runbook that empties the default security group.
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ssm:<AWS::Region>:<AWS::AccountId>:automation-definition/AWSConfigRemediation-RemoveVPCDefaultSecurityGroupRules:*]",
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ssm:<AWS::Region>:<AWS::AccountId>:automation-execution/*]",
    # The supervisor: fleets, run templates, instances, volumes, gangs' placement groups and the user's network are
    # made or chosen at run time.
    *(
        f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:{resource}/*]"
        for resource in (
            "fleet",
            "launch-template",
            "volume",
            "subnet",
            "security-group",
            "network-interface",
            "placement-group",
            "capacity-reservation",
        )
    ),
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>::image/*]",
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:iam::<AWS::AccountId>:role/aws-service-role/ec2fleet.amazonaws.com/*]",
    "AwsSolutions-IAM5[Resource::{runs}/index/*]",
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:s3:::cdk-hnb659fds-assets-<AWS::AccountId>-<AWS::Region>/*.xz]",
    # launch --secret: SSM parameters under /training-infra/ and secrets tagged managed, named at launch.
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ssm:<AWS::Region>:<AWS::AccountId>:parameter/training-infra/*]",
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:secretsmanager:<AWS::Region>:<AWS::AccountId>:secret:*]",
    # The secrets reader role: customer-managed keys of SecureStrings and secrets, only through SSM/Secrets Manager.
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:kms:<AWS::Region>:<AWS::AccountId>:key/*]",
    "AwsSolutions-IAM5[Resource::{outputs}/runs/*/attempts/*/status.json]",
    # The supervisor's requests function writes each run's spec.yaml (run ids are made at launch time).
    "AwsSolutions-IAM5[Resource::{outputs}/runs/*/spec.yaml]",
    "AwsSolutions-IAM5[Resource::{outputs}/runs/*/attempts/*/progress.json]",  # a sweep member's values
}


def _known_findings(synthesized) -> set[str]:
    storage_view = synthesized.stack(naming.STORAGE_STACK)
    storage = storage_view.construct("Storage")
    exports = {
        json.dumps(output["Value"], sort_keys=True): output["Export"]["Name"]
        for output in storage_view.json["Outputs"].values()
        if "Export" in output
    }

    def imported(bucket) -> str:
        return exports[json.dumps({"Fn::GetAtt": [storage_view.logical_id(bucket), "Arn"]}, sort_keys=True)]

    run_table = storage_view.construct("RunTable").table
    names = {
        "data": imported(storage.data_bucket),
        "outputs": imported(storage.outputs_bucket),
        "runs": imported(run_table),
    }
    return {finding.format(**names) for finding in ACKNOWLEDGED_NAG_FINDINGS}


def _acknowledgements(outdir: Path) -> dict[str, str]:
    """Rule id -> reason, from the construct tree metadata the synth wrote."""
    found: dict[str, str] = {}
    for manifest in outdir.glob("*.metadata.json"):
        for entries in json.loads(manifest.read_text()).values():
            for entry in entries:
                if "acknowledged" in entry.get("type", ""):
                    for key, reason in entry["data"].items():
                        found[key.split("::", 1)[-1]] = reason
    return found


@pytest.mark.parametrize("config", list(CONFIGURATIONS))
def test_cdk_nag_passes_and_only_known_findings_are_acknowledged_with_reasons(synth, config):
    synthesized = synth(config)  # the synth raises ValidationFailed while any finding is open
    acknowledged = {
        key: reason for key, reason in _acknowledgements(synthesized.outdir).items() if key.startswith("AwsSolutions-")
    }
    known = _known_findings(synthesized)
    assert set(acknowledged) <= known, set(acknowledged) - known
    for rule, reason in acknowledged.items():
        assert len(reason) > 30, f"{rule} needs a reason a reviewer would accept, got {reason!r}"


@pytest.mark.parametrize("config", list(CONFIGURATIONS))
def test_cfn_lint_reports_no_error_and_no_warning(synth, config):
    templates = sorted(str(path) for path in synth(config).outdir.glob("*.template.json"))
    result = subprocess.run([str(VENV_BIN / "cfn-lint"), *templates], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", list(CONFIGURATIONS))
def test_checkov_fails_nothing_and_every_skip_has_a_comment(synth, config):
    outdir = synth(config).outdir
    result = subprocess.run(
        [
            str(VENV_BIN / "checkov"),
            "-d",
            str(outdir),
            "--framework",
            "cloudformation",
            "--skip-download",
            "--quiet",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [
        (check["check_id"], check["resource"]) for report in reports for check in report["results"]["failed_checks"]
    ]
    assert failed == [], failed
    assert result.returncode == 0
    for template in outdir.glob("*.template.json"):
        for logical_id, resource in json.loads(template.read_text())["Resources"].items():
            for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
                assert len(skip.get("comment", "")) > 30, (
                    f"{template.name}:{logical_id} skips {skip['id']} without a real reason"
                )


# --- cfripper and parliament (issue 15): every finding they report is accepted here, with its reason ---------
#
# Findings are named by the construct path of the resource they are about (`Stack:path/in/stack`,
# fnmatch patterns), never by a generated logical id. A finding not listed fails the gate.

ENDPOINT = "TrainingInfra-Compute:Compute/Vpc/S3/*"
INSTANCE_POLICY = "TrainingInfra-Compute:Compute/InstanceRole/DefaultPolicy/*"
ALERTS_KEY = "TrainingInfra-Safety:Safety/AlertsKey/*"
BUDGET_ACTION_POLICY = "TrainingInfra-Compute:Supervisor/BudgetActionRole/DefaultPolicy/*"
BUCKET_POLICIES = "TrainingInfra-Storage:Storage/*Bucket/Policy/*"
SUPERVISOR_POLICY = "TrainingInfra-Compute:Supervisor/*/Role/DefaultPolicy/*"  # the event and request functions
USER_POLICY = "TrainingInfra-Compute:TrainingUserPolicy/*"
SSM_AGENT_ACTIONS = (
    "ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel", "ec2messages:AcknowledgeMessage", "ec2messages:DeleteMessage",
    "ec2messages:FailMessage",
    "ec2messages:GetEndpoint", "ec2messages:GetMessages", "ec2messages:SendReply",
)  # fmt: skip
ENDPOINT_ACTIONS = (
    "s3:AbortMultipartUpload",
    "s3:DeleteObject",
    "s3:GetBucketLocation",
    "s3:GetObject",
    "s3:GetObjectVersion",
    "s3:ListBucket",
    "s3:ListBucketVersions",
    "s3:PutObject",
)

# (rule, resource pattern, action or None) -> why the finding stays.
CFRIPPER_ACCEPTED: dict[tuple[str, str, str | None], str] = {
    (
        "GenericResourceFullWildcardPrincipalRule",
        ENDPOINT,
        None,
    ): "A gateway endpoint policy grants nothing by itself: it "
    "filters what any caller in the VPC may reach through the endpoint (Principal * is AWS's form); the caller's "
    "own IAM "
    "policy must allow too. The destination is limited by aws:ResourceAccount and the ECR layer bucket's ARN.",
    (
        "GenericCrossAccountTrustRule",
        ENDPOINT,
        None,
    ): "The same Principal * of the endpoint policy; no account is trusted "
    "by it (an endpoint policy cannot grant access, only narrow it).",
    **{
        (
            "WildcardResourceRule",
            ENDPOINT,
            action,
        ): "Resource * with aws:ResourceAccount = this account: every bucket of "
        "the account (names unknown to the compute stack) and none of any other account."
        for action in ENDPOINT_ACTIONS
    },
    **{
        ("WildcardResourceRule", INSTANCE_POLICY, action): "ssmmessages and ec2messages actions have no resource types "
        "(Service Authorization Reference); the SSM agent's channels can only be granted on *."
        for action in SSM_AGENT_ACTIONS
    },
    ("WildcardResourceRule", SUPERVISOR_POLICY, "pricing:GetProducts"): "The Price List API has no resource types "
    "(Service Authorization Reference): GetProducts can only be granted on *, and it reads AWS's public prices "
    "(a run's price cap).",
    ("WildcardResourceRule", USER_POLICY, "pricing:GetProducts"): "The Price List API has no resource types: the "
    "CLI's preflight reads AWS's public list prices (the built-in table is its fallback).",
    ("WildcardResourceRule", USER_POLICY, "servicequotas:GetServiceQuota"): "The preflight reads the account's "
    "G/P vCPU quotas by quota code; GetServiceQuota on * reads quotas, it changes nothing.",
    **{
        ("WildcardResourceRule", policy, "ec2:GetSpotPlacementScores"): "GetSpotPlacementScores has no resource "
        "types (Service Authorization Reference): it can only be granted on *; it reads EC2's spot placement scores "
        "for the run's types and changes nothing (supervisor/runtime/capacity.py)."
        for policy in (SUPERVISOR_POLICY, USER_POLICY)
    },
    ("WildcardResourceRule", USER_POLICY, "ec2:DescribeCapacityBlockOfferings"): "DescribeCapacityBlockOfferings has "
    "no resource types: `capacity offers` lists what EC2 sells; buying (PurchaseCapacityBlock) is not granted.",
    ("PrivilegeEscalationRule", BUDGET_ACTION_POLICY, None): "AWS Budgets' action role may attach exactly one "
    "policy (iam:PolicyARN condition: the deny-launches policy) to exactly one role (the supervisor's): it can "
    "only take permissions away, which is the point of the budget action.",
    **{
        (rule, "TrainingInfra-Compute:Compute/SecretsReaderRole/Resource", None): "cfripper cannot resolve a GetAtt "
        "principal and calls it cross-account: it is this stack's own instance role (tests/test_security.py asserts "
        "the trust names exactly that role)."
        for rule in ("CrossAccountTrustRule", "GenericCrossAccountTrustRule")
    },
    ("GenericResourceWildcardPolicyRule", ALERTS_KEY, None): "The key policy's default statement (kms:* for this "
    "account's root) keeps the key manageable by the account's IAM; without it a key can become unmanageable.",
}

# (issue, resource pattern) -> why the finding stays. Trust policies are not given to parliament: it
# checks identity and resource policies and reports a trust policy's missing Resource as MALFORMED
# (its statement.py says so); they are asserted in tests/test_registry.py and tests/test_security.py.
PARLIAMENT_ACCEPTED: dict[tuple[str, str], str] = {
    (
        "RESOURCE_STAR",
        ENDPOINT,
    ): "Endpoint policy: Resource * narrowed to this account's buckets by aws:ResourceAccount.",
    (
        "PERMISSIONS_MANAGEMENT_ACTIONS",
        BUDGET_ACTION_POLICY,
    ): "AWS Budgets' action role attaches and detaches one deny policy (iam:PolicyARN condition) on the "
    "supervisor's role only: it can take permissions away, never add any.",
    ("RESOURCE_STAR", ALERTS_KEY): "In a key policy Resource * is the key itself: the only form a key policy accepts.",
    (
        "PERMISSIONS_MANAGEMENT_ACTIONS",
        ALERTS_KEY,
    ): "kms:* for the account root: the default key-administration statement.",
    (
        "CREDENTIALS_EXPOSURE",
        INSTANCE_POLICY,
    ): "ecr:GetAuthorizationToken is how the box logs in to pull its image, and "
    "sts:AssumeRole (trainer_s3_access only) is how the agent gets the narrower trainer role's credentials.",
    (
        "CREDENTIALS_EXPOSURE",
        "TrainingInfra-Registry:Registry/GithubPushRole/DefaultPolicy/*",
    ): "ecr:GetAuthorizationToken: the image workflow must log in to ECR to push.",
    ("RESOURCE_MISMATCH", "TrainingInfra-Compute:Compute/TrainerRole/DefaultPolicy/*"): "parliament 1.6.4 strips only "
    "policy variables matching ${aws.[\\w/]+}; the run-id tag's '-' and ':' keep "
    "${aws:PrincipalTag/training-infra:run-id} "
    "in the object ARNs, which then look malformed to it.",
    (
        "PERMISSIONS_MANAGEMENT_ACTIONS",
        SUPERVISOR_POLICY,
    ): "The supervisor launches the training instances: iam:PassRole of the instance role only (condition "
    "iam:PassedToService = ec2.amazonaws.com) and iam:CreateServiceLinkedRole of the EC2 Fleet service-linked role "
    "only (iam:AWSServiceName).",
    ("PRIVILEGE_ESCALATION", SUPERVISOR_POLICY): "CreateEC2WithExistingIP (iam:PassRole + ec2:RunInstances): the "
    "only role it may pass is the instance role, and it may launch only from launch templates tagged "
    "created-by=supervisor, only instances with the project's instance profile (ec2:InstanceProfile) and an allowed "
    "type, only into the stack's subnets and security group. The tag is not proof (anyone in the account who may "
    "create and tag launch templates can copy it; TrainingUserPolicy grants neither, and docs/cli.md tells admins to "
    "detach the old CLI permissions), so before any launch the code checks the template itself: its CreatedBy is "
    "one of the supervisor's roles, and its content is the stack template's default version (whose image is the "
    "deployed one) plus the run's allowlisted exports and the seal of its record (run_requests.run_template_problem). "
    "What a launch can gain is the instance role, which a run gets by design (issue 23).",
    ("RESOURCE_MISMATCH", SUPERVISOR_POLICY): "ec2:RunInstances and ec2:CreateFleet are authorized per resource "
    "(instance, template, volume, subnet, security group, image, ...); each resource has its own statement with the "
    "condition keys the Service Authorization Reference lists for it, which parliament reads statement by statement "
    "as mismatches. ec2:CreateSecurityGroup (a gang's group) likewise: the VPC it is made in (the stack's, by ARN) and "
    "the group it makes (the created-by request tag) are two statements.",
    (
        "MISMATCHED_TYPE",
        BUCKET_POLICIES,
    ): "The TLS-floor deny's s3:TlsVersion 1.2: parliament's Numeric check accepts only "
    "integers (a known false positive).",
    (
        "UNKNOWN_CONDITION_FOR_ACTION",
        BUCKET_POLICIES,
    ): "The TLS-floor deny covers s3:* (so every request below TLS 1.2 is "
    "refused); parliament reports each expanded action whose own keys do not list s3:TlsVersion.",
}
PARLIAMENT_POLICY_DOCUMENTS = {
    "AWS::IAM::Policy": "PolicyDocument",
    "AWS::IAM::ManagedPolicy": "PolicyDocument",
    "AWS::S3::BucketPolicy": "PolicyDocument",
    "AWS::SNS::TopicPolicy": "PolicyDocument",
    "AWS::KMS::Key": "KeyPolicy",
    "AWS::EC2::VPCEndpoint": "PolicyDocument",
}


def _construct_paths(synthesized) -> dict[tuple[str, str], str]:
    """(stack, logical id) -> `Stack:path/below/the/stack` for every CloudFormation resource."""
    from aws_cdk import CfnResource, Stack

    paths = {}
    for stack_name in synthesized.templates:
        stack = synthesized.app.node.find_child(stack_name)
        for node in stack.node.find_all():
            if isinstance(node, CfnResource) and Stack.of(node) is stack:
                paths[(stack_name, stack.resolve(node.logical_id))] = f"{stack_name}:{node.node.path.split('/', 1)[1]}"
    return paths


def _accepted(path: str, patterns) -> str | None:
    return next((reason for pattern, reason in patterns if fnmatch.fnmatchcase(path, pattern)), None)


@pytest.mark.parametrize("config", list(CONFIGURATIONS))
def test_cfripper_reports_only_accepted_findings(synth, config, tmp_path):
    synthesized = synth(config)
    paths = _construct_paths(synthesized)
    names = sorted(synthesized.templates)
    for name in names:
        template = synthesized.templates[name]
        # cfripper's model (pycfmodel 2.1.3) takes NumericLessThan values as integers only and refuses the whole
        # template on s3:TlsVersion 1.2; it has no rule on the value, so its copy carries 1 (tests/test_storage.py
        # asserts the real 1.2).
        text = json.dumps(template).replace('"s3:TlsVersion": 1.2', '"s3:TlsVersion": 1')
        (tmp_path / f"{name}.template.json").write_text(text)
    result = subprocess.run(
        [str(VENV_BIN / "cfripper"), "--resolve", "--format", "json", "--aws-account-id", "123456789012",
         *(str(tmp_path / f"{name}.template.json") for name in names)],
        capture_output=True, text=True,
    )  # fmt: skip
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == len(names), result.stdout[-2000:] + result.stderr[-2000:]
    unexplained = []
    for name, report in zip(names, reports, strict=True):
        assert report["exceptions"] == [], (name, report["exceptions"])
        for failure in report["failures"]:
            action = re.search(r'for "([^"]+)"$', failure["reason"])
            for logical_id in failure["resource_ids"]:
                path = paths.get((name, logical_id), f"{name}:{logical_id}")
                patterns = [(pattern, reason) for (rule, pattern, act), reason in CFRIPPER_ACCEPTED.items()
                            if rule == failure["rule"] and act == (action[1] if action else None)]  # fmt: skip
                if _accepted(path, patterns) is None:
                    unexplained.append((failure["rule"], path, failure["reason"]))
    assert unexplained == []
    for reason in CFRIPPER_ACCEPTED.values():
        assert len(reason) > 30


@pytest.mark.parametrize("config", list(CONFIGURATIONS))
def test_parliament_reports_only_accepted_findings_on_every_policy(synth, config):
    import parliament

    synthesized = synth(config)
    paths = _construct_paths(synthesized)
    resolver = _PolicyResolver(synthesized.templates)
    unexplained, checked = [], 0
    for name, template in sorted(synthesized.templates.items()):
        for logical_id, resource in template["Resources"].items():
            key = PARLIAMENT_POLICY_DOCUMENTS.get(resource["Type"])
            document = resource.get("Properties", {}).get(key) if key else None
            if not document:
                continue
            checked += 1
            policy = parliament.analyze_policy_string(
                json.dumps(resolver.resolve(document, name)), include_community_auditors=True
            )
            path = paths[(name, logical_id)]
            for finding in policy.findings:
                patterns = [
                    (pattern, reason)
                    for (issue, pattern), reason in PARLIAMENT_ACCEPTED.items()
                    if issue == finding.issue
                ]
                if finding.issue in ("MISMATCHED_TYPE", "UNKNOWN_CONDITION_FOR_ACTION") and "s3:TlsVersion" not in str(
                    finding.detail
                ):
                    patterns = []
                if finding.issue == "PRIVILEGE_ESCALATION" and "CreateEC2WithExistingIP" not in str(finding.location):
                    patterns = []
                if finding.issue == "RESOURCE_MISMATCH" and "Supervisor" in path:
                    launch_actions = {"ec2:CreateFleet", "ec2:RunInstances", "ec2:CreateSecurityGroup"}
                    patterns = patterns if {m["action"] for m in finding.detail} <= launch_actions else []
                if _accepted(path, patterns) is None:
                    unexplained.append((finding.issue, path, str(finding.detail)[:200]))
    assert checked >= 8  # bucket, topic, key, endpoint and role policies were all analysed
    assert unexplained == [], "\n".join(map(str, unexplained))


class _PolicyResolver:
    """Intrinsic functions -> the strings AWS would see, so parliament can match ARNs to actions.

    Pseudo parameters become a fixed account and region; a reference to a resource becomes an ARN of
    that resource's type (its logical id as the name); an import becomes the exporting stack's value;
    s3:TlsVersion 1.2 becomes the string "1.2" (parliament's regex check needs a string).
    """

    PSEUDO = {
        "AWS::Partition": "aws",
        "AWS::Region": "us-east-1",
        "AWS::AccountId": "123456789012",
        "AWS::URLSuffix": "amazonaws.com",
    }
    ARNS = {
        "AWS::S3::Bucket": "arn:aws:s3:::{name}",
        "AWS::IAM::Role": "arn:aws:iam::123456789012:role/{name}",
        "AWS::KMS::Key": "arn:aws:kms:us-east-1:123456789012:key/{name}",
        "AWS::Logs::LogGroup": "arn:aws:logs:us-east-1:123456789012:log-group:{name}:*",
        "AWS::SNS::Topic": "arn:aws:sns:us-east-1:123456789012:{name}",
        "AWS::ECR::Repository": "arn:aws:ecr:us-east-1:123456789012:repository/{name}",
        "AWS::Events::Rule": "arn:aws:events:us-east-1:123456789012:rule/{name}",
        "AWS::IAM::InstanceProfile": "arn:aws:iam::123456789012:instance-profile/{name}",
        "AWS::DynamoDB::Table": "arn:aws:dynamodb:us-east-1:123456789012:table/{name}",
        "AWS::IAM::ManagedPolicy": "arn:aws:iam::123456789012:policy/{name}",
        "AWS::Lambda::Function": "arn:aws:lambda:us-east-1:123456789012:function:{name}",
    }

    def __init__(self, templates: dict[str, dict]) -> None:
        self.templates = templates
        self.exports = {
            output["Export"]["Name"]: (stack, output["Value"])
            for stack, template in templates.items()
            for output in template.get("Outputs", {}).values()
            if "Export" in output
        }

    def _arn(self, stack: str, logical_id: str) -> str:
        resource_type = self.templates[stack]["Resources"][logical_id]["Type"]
        return self.ARNS.get(resource_type, "{name}").format(name=logical_id.lower())

    def resolve(self, node, stack: str):
        if isinstance(node, float):
            return f"{node:g}"
        if isinstance(node, list):
            return [self.resolve(item, stack) for item in node]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((function, value),) = node.items()
            if function == "Ref":
                if value in self.PSEUDO:
                    return self.PSEUDO[value]
                if value in self.templates[stack].get("Parameters", {}):  # the AMI from SSM: an id at deploy
                    return "ami-0123456789abcdef0"
                resource_type = self.templates[stack]["Resources"][value]["Type"]
                # Ref is the ARN for topics and managed policies, the name for buckets and repositories, the id
                # for the rest.
                arn_refs = ("AWS::SNS::Topic", "AWS::IAM::ManagedPolicy")
                return self._arn(stack, value) if resource_type in arn_refs else value.lower()
            if function == "Fn::GetAtt":
                return self._arn(stack, value[0])
            if function == "Fn::Join":
                return value[0].join(str(self.resolve(item, stack)) for item in value[1])
            if function == "Fn::ImportValue":
                exporter, exported = self.exports[value]
                return self.resolve(exported, exporter)
            if function == "Fn::Sub" and isinstance(value, str):  # the CDK asset bucket's name
                return re.sub(r"\$\{([\w:]+)\}", lambda found: self.PSEUDO[found[1]], value)
        return {key: self.resolve(item, stack) for key, item in node.items()}
