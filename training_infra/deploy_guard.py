"""Stop a deploy that would delete what a setting left out this time, or touch a live training run.

`make deploy` synthesizes into cdk.out, runs this, and only then `cdk deploy --app cdk.out`, so
what was checked is exactly what is deployed. It compares every synthesized stack with the
template CloudFormation holds for it (GetTemplate) and refuses, one line per finding:

- removal of a protected resource: the GitHub OIDC provider and roles (a deploy without
  `github_repo`), the alert e-mail subscription (without `alert_email`), the budget, and the
  hard limit's backstop (without `monthly_limit_usd`): the Budgets action, the
  `DenyLaunchesPastBudget` policy it attaches to the supervisor and the role it attaches it with;
- deletion of, or any property change to, an AWS::EC2::Instance whose instance is still
  running: CloudFormation would replace or modify a training run in the middle.

`--allow-destructive` (`make deploy ALLOW_DESTRUCTIVE=1`) prints the same lines and lets the
deploy go ahead. A stack that is not deployed yet has nothing to guard.

`--destroy` guards `make destroy` (which deletes the compute stack: the supervisor, the launch
templates, the instance role and any `create_instance` box) the same way: it refuses, one line
per run, while a managed run is active: its record in the run table is launching, running,
recovering or stopping, or an instance tagged `training-infra:managed` is still up. It reads the
tag alone, not the instance profile the reaper also requires: a guard that may only refuse errs
towards refusing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions
import botocore.session
from botocore.parsers import ResponseParserError

from training_infra import naming
from training_infra.supervisor.runtime.records import ACTIVE_INDEX, ACTIVE_STATES

ALLOW_VARIABLE = "ALLOW_DESTRUCTIVE=1"
LIVE_STATES = ("pending", "running", "stopping")
_EXPORT = re.compile(r"^export (TI_[A-Z0-9_]+)=(.*)$", re.MULTILINE)
# Which setting reaches the instance through which agent variable (user data).
_EXPORT_SETTINGS = {
    "TI_IMAGE_TAG": "image_tag",
    "TI_TRAINING_COMMAND": "training_command",
    "TI_MAX_RUNTIME_SECONDS": "max_runtime_hours",
    "TI_AUTO_SHUTDOWN": "auto_shutdown",
    "TI_IDLE_SECONDS": "idle_minutes",
    "TI_IDLE_GPU_PERCENT": "idle_gpu_percent",
    "TI_CHECKPOINT_SYNC_SECONDS": "checkpoint_sync_seconds",
    "TI_DATA_ACCESS": "data_access",
    "TI_MARKET": "use_spot",
    "TI_HOURLY_PRICE_USD": "instance_type",
    "TI_RUN_ID": "run_id",
    "TI_ALERTS_TOPIC_ARN": "the alert topic",
    "TI_IMAGE_URI": "ecr_repository_name",
}
# Which setting an instance (or launch template data) property comes from.
_PROPERTY_SETTINGS = {
    "ImageId": "image_id (or the AMI that ami_parameter resolves to)",
    "InstanceType": "instance_type",
    "LaunchTemplate": "the launch template the instance names",
    "SubnetId": "vpc_id / subnet_ids / availability_zones",
    "Tags": "max_runtime_hours (instance tags)",
    "TagSpecifications": "max_runtime_hours (instance tags)",
    "BlockDeviceMappings": "volume_size_gb",
    "InstanceMarketOptions": "use_spot / spot_max_price",
    "InstanceInitiatedShutdownBehavior": "auto_shutdown",
    "MetadataOptions": "the instance metadata options",
    "LaunchTemplateData": "a setting of the launch template",
}
_SSM_PARAMETER_TYPE = "AWS::SSM::Parameter::Value<"
# Resources an instance names by `Ref` whose change replaces them, and so the instance in them.
_REPLACES_ITS_INSTANCE = ("AWS::EC2::Subnet", "AWS::EC2::VPC")


@dataclass(frozen=True)
class Finding:
    stack: str
    logical_id: str
    message: str

    def __str__(self) -> str:
        return f"{self.stack}: {self.message}"


# ---- templates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthesizedStack:
    name: str
    region: str | None  # None: environment-agnostic, deployed to the credentials' region
    template: dict[str, Any]


def synthesized_stacks(cdk_out: Path) -> list[SynthesizedStack]:
    """The stacks of the cloud assembly (what `cdk deploy --app cdk.out` deploys), from its manifest."""
    manifest = json.loads((cdk_out / "manifest.json").read_text())
    stacks = []
    for artifact_id, artifact in manifest.get("artifacts", {}).items():
        if artifact.get("type") != "aws:cloudformation:stack":
            continue
        properties = artifact.get("properties", {})
        name = properties.get("stackName") or artifact.get("displayName") or artifact_id
        region = str(artifact.get("environment", "")).rsplit("/", 1)[-1]
        template = json.loads((cdk_out / properties["templateFile"]).read_text())
        stacks.append(SynthesizedStack(name, None if region in ("", "unknown-region") else region, template))
    return stacks


def _resources(template: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return (template or {}).get("Resources", {}) or {}


def _text(value: Any) -> str:
    """A template value as text, intrinsic functions written out (`{"Ref": "X"}`), for comparison and messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"Fn::Base64"}:
        return _text(value["Fn::Base64"])
    if (
        isinstance(value, dict)
        and set(value) == {"Fn::Join"}
        and isinstance(value["Fn::Join"], list)
        and len(value["Fn::Join"]) == 2
    ):
        separator, parts = value["Fn::Join"]
        if isinstance(separator, str) and isinstance(parts, list):
            return separator.join(_text(part) for part in parts)
    return json.dumps(value, sort_keys=True)


def _web_identity_repo(role: dict[str, Any]) -> str | None:
    """The GitHub repository a role trusts (`repo:owner/name:...`), or None for a role that is not a GitHub role."""
    document = role.get("Properties", {}).get("AssumeRolePolicyDocument", {})
    for statement in document.get("Statement", []) if isinstance(document, dict) else []:
        actions = statement.get("Action", [])
        if "sts:AssumeRoleWithWebIdentity" not in (actions if isinstance(actions, list) else [actions]):
            continue
        subjects = [
            v
            for condition in statement.get("Condition", {}).values()
            if isinstance(condition, dict)
            for k, v in condition.items()
            if k.endswith(":sub")
        ]
        for subject in subjects:
            match = re.match(r"^repo:([^:]+):", subject if isinstance(subject, str) else "")
            if match:
                return match[1]
        return "?"
    return None


def _email_subscription(resource: dict[str, Any]) -> bool:
    return resource.get("Type") == "AWS::SNS::Subscription" and resource.get("Properties", {}).get("Protocol") in (
        "email",
        "email-json",
    )


def _budget_backstop_removals(
    stack: str, deployed: dict[str, Any], synthesized: dict[str, Any] | None
) -> tuple[list[Finding], set[str]]:
    """Each deployed Budgets action that loses itself, the policy it attaches or its execution role:
    one finding naming them all (without any of them, passing the budget no longer stops launches).
    Also every logical id named, so the generic checks do not name it twice."""
    old, new = _resources(deployed), _resources(synthesized)
    findings: list[Finding] = []
    named: set[str] = set()
    for action_id, action in sorted(old.items()):
        if action.get("Type") != "AWS::Budgets::BudgetsAction":
            continue
        properties = action.get("Properties", {})
        policy_refs, _ = _references(
            ((properties.get("Definition") or {}).get("IamActionDefinition") or {}).get("PolicyArn")
        )
        _, role_refs = _references(properties.get("ExecutionRoleArn"))
        parts = [(action_id, "the Budgets action")]
        parts += [(policy, "the policy") for policy in sorted(policy_refs & set(old))]
        parts += [(role, "the Budgets action's role") for role in sorted(role_refs & set(old))]
        gone = [(logical_id, what) for logical_id, what in parts if logical_id not in new]
        if not gone:
            continue
        named |= {logical_id for logical_id, _ in gone}
        limit = _text(((deployed.get("Outputs") or {}).get(naming.OUTPUT_MONTHLY_LIMIT_USD) or {}).get("Value", ""))
        if action_id not in new and not any(r.get("Type") == action.get("Type") for r in new.values()):
            fix = (
                f'this deploy has no monthly_limit_usd; set "monthly_limit_usd": "{limit}" in cdk.json\'s context'
                if limit and limit != "0"
                else "this deploy has no monthly_limit_usd; set it in cdk.json's context"
            )
        else:
            fix = "check monthly_limit_usd and that this is the training-infra app"
        names = [f"{what} {logical_id}" for logical_id, what in gone]
        listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        findings.append(Finding(stack, action_id, (
            f"would delete {listed}, which stop the supervisor's launches once the monthly budget is passed: {fix}"
        )))  # fmt: skip
    return findings, named


def protected_removals(stack: str, deployed: dict[str, Any], synthesized: dict[str, Any] | None) -> list[Finding]:
    """Protected resources in the deployed template that the synthesized one no longer has."""
    old, new = _resources(deployed), _resources(synthesized)
    new_email_topics = {_text(r["Properties"].get("TopicArn")) for r in new.values() if _email_subscription(r)}
    findings, named = _budget_backstop_removals(stack, deployed, synthesized)
    for logical_id, resource in sorted(old.items()):
        if logical_id in new or logical_id in named:
            continue
        kind = resource.get("Type")
        properties = resource.get("Properties", {})
        if kind == "AWS::IAM::OIDCProvider":
            findings.append(Finding(stack, logical_id, (
                f"would delete the GitHub OIDC provider ({logical_id}): this deploy has no github_repo (or now sets "
                "existing_oidc_provider_arn); set github_repo in cdk.json's context"
            )))  # fmt: skip
        elif kind == "AWS::IAM::Role" and (repo := _web_identity_repo(resource)) is not None:
            findings.append(Finding(stack, logical_id, (
                f"would delete the GitHub role {logical_id} trusted by {repo}: this deploy has no github_repo; "
                f"set \"github_repo\": \"{repo}\" in cdk.json's context"
            )))  # fmt: skip
        elif _email_subscription(resource):
            if _text(properties.get("TopicArn")) in new_email_topics:
                continue  # alert_email changed: the new address replaces the old one
            email = properties.get("Endpoint", "?")
            findings.append(Finding(stack, logical_id, (
                f"would delete the alert e-mail subscription of {email}: this deploy has no alert_email; "
                f"set \"alert_email\": \"{email}\" in cdk.json's context"
            )))  # fmt: skip
        elif kind == "AWS::Budgets::Budget":
            findings.append(
                Finding(
                    stack,
                    logical_id,
                    f"would delete the budget {logical_id}: "
                    "check monthly_budget_usd and that this is the training-infra app",
                )
            )
    return findings


def _exports(user_data: str) -> dict[str, str]:
    return dict(_EXPORT.findall(user_data))


def _changed_settings(old_props: dict[str, Any], new_props: dict[str, Any]) -> list[str]:
    """What differs between two sets of properties, named by the settings behind them."""
    names = []
    if not (isinstance(old_props, dict) and isinstance(new_props, dict)):
        return [] if old_props == new_props else ["a setting"]
    for key in sorted(set(old_props) | set(new_props)):
        before, after = old_props.get(key), new_props.get(key)
        if before == after:
            continue
        if key == "UserData":
            old_exports, new_exports = _exports(_text(before)), _exports(_text(after))
            changed = [
                k for k in sorted(set(old_exports) | set(new_exports)) if old_exports.get(k) != new_exports.get(k)
            ]
            for export in changed:
                names.append(
                    f"{_EXPORT_SETTINGS.get(export, export)} "
                    f"({export}: {old_exports.get(export, '-')} -> {new_exports.get(export, '-')})"
                )
            if not changed:
                names.append("the agent script (user data)")
        elif key == "LaunchTemplateData":
            names += _changed_settings(before or {}, after or {})
        else:
            names.append(f"{_PROPERTY_SETTINGS.get(key, key)} ({key})")
    return names


def _references(value: Any) -> tuple[set[str], set[str]]:
    """(names in `Ref`, resources in `Fn::GetAtt`) anywhere inside a template value."""
    refs: set[str] = set()
    attributes: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "Ref" and isinstance(inner, str):
                refs.add(inner)
            elif key == "Fn::GetAtt":
                target = inner[0] if isinstance(inner, list) and inner else str(inner).split(".", 1)[0]
                attributes.add(target)
            else:
                more_refs, more_attributes = _references(inner)
                refs |= more_refs
                attributes |= more_attributes
    elif isinstance(value, list):
        for inner in value:
            more_refs, more_attributes = _references(inner)
            refs |= more_refs
            attributes |= more_attributes
    return refs, attributes


def _reasons(
    logical_id: str, old: dict[str, Any], new: dict[str, Any], parameters: dict[str, tuple[str, str]]
) -> list[str]:
    """Why CloudFormation would update this instance: its own properties, a `Fn::GetAtt` of a resource
    that changes (a launch template's LatestVersionNumber), or an SSM parameter that now resolves to
    another value (a newer AMI). `parameters`: name -> (value resolved at the last deploy, value now).
    """
    old_resources, new_resources = _resources(old), _resources(new)
    instance_old = old_resources[logical_id].get("Properties", {})
    instance_new = new_resources[logical_id].get("Properties", {})
    reasons = _changed_settings(instance_old, instance_new)
    refs, attributes = _references(instance_new)
    # A subnet or VPC whose properties change is replaced, and the instance in it with it.
    for target in sorted(refs & set(new_resources)):
        if new_resources[target].get("Type") in _REPLACES_ITS_INSTANCE and target in old_resources:
            before, after = old_resources[target].get("Properties", {}), new_resources[target].get("Properties", {})
            if before != after:
                keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
                reasons.append(f"the network ({', '.join(keys)} of {target}; availability_zones, vpc_id or subnet_ids)")
    for target in sorted(attributes):
        if target in old_resources and target in new_resources:
            before, after = old_resources[target].get("Properties", {}), new_resources[target].get("Properties", {})
            if before != after:
                reasons += [f"{reason} via {target}" for reason in _changed_settings(before, after)]
    for name in sorted(refs & set(parameters)):
        resolved, now = parameters[name]
        if resolved != now:
            reasons.append(
                f"ami_parameter / the SSM parameter behind {name} "
                f"({resolved} -> {now}; pin image_id to keep {resolved})"
            )
    return reasons


def _run_id_of(resource: dict[str, Any], resources: dict[str, Any]) -> str:
    """The run id an instance resource carries: its own tags, else its launch template's instance tags."""
    properties = resource.get("Properties", {})
    tags = list(properties.get("Tags", []) or [])
    template_ref = (properties.get("LaunchTemplate") or {}).get("LaunchTemplateId")
    if isinstance(template_ref, dict) and template_ref.get("Ref") in resources:
        data = resources[template_ref["Ref"]].get("Properties", {}).get("LaunchTemplateData", {})
        for spec in data.get("TagSpecifications", []) or []:
            if spec.get("ResourceType") == "instance":
                tags += spec.get("Tags", [])
    for tag in tags:
        if isinstance(tag, dict) and tag.get("Key") == naming.TAG_RUN_ID:
            return str(tag.get("Value"))
    return "?"


def instance_changes(
    stack: str,
    deployed: dict[str, Any],
    synthesized: dict[str, Any] | None,
    live: dict[str, tuple[str, str]],
    parameters: dict[str, tuple[str, str]] | None = None,
) -> list[Finding]:
    """Deletions of, and changes to, instances that are still up.

    `live`: logical id -> (instance id, state); `parameters`: SSM-typed parameters the deployed
    stack resolved, name -> (then, now).
    """
    old, new = _resources(deployed), _resources(synthesized)
    findings = []
    for logical_id, (instance_id, state, *tagged) in sorted(live.items()):
        resource = old.get(logical_id)
        if resource is None:
            continue
        run_id = tagged[0] if tagged and tagged[0] else _run_id_of(resource, old)
        if state not in LIVE_STATES:
            # The run's instance ended; replacing the resource would start a new, billed one.
            if logical_id in new:
                changed = _reasons(logical_id, deployed, synthesized or {}, parameters or {})
                if changed:
                    findings.append(Finding(stack, logical_id, (
                        f"this deploy would start a new instance for run {run_id}, whose instance {instance_id} has "
                        f"ended ({state}), because of {', '.join(changed)}; for a new run set a new run_id, for none "
                        f"set create_instance to false, or accept with `make deploy {ALLOW_VARIABLE}`"
                    )))  # fmt: skip
            continue
        how = (
            f"wait for it to end (`training-infra status {run_id}`), end it (`training-infra stop {run_id}`), "
            f"or accept with `make deploy {ALLOW_VARIABLE}`"
        )
        if logical_id not in new:
            next_runs = [_run_id_of(r, new) for r in new.values() if r.get("Type") == "AWS::EC2::Instance"]
            why = f"run_id is now {', '.join(next_runs)}" if next_runs else "create_instance is no longer true"
            findings.append(Finding(stack, logical_id, (
                f"the run {run_id} is still {state} on {instance_id} ({logical_id}) and this deploy would terminate it "
                f"({why}); {how}"
            )))  # fmt: skip
            continue
        changed = _reasons(logical_id, deployed, synthesized or {}, parameters or {})
        if changed:
            findings.append(Finding(stack, logical_id, (
                f"the run {run_id} is still {state} on {instance_id} ({logical_id}) "
                f"and this deploy would modify or replace it "
                f"because of {', '.join(changed)}; keep that setting until the run ends, or {how}"
            )))  # fmt: skip
    return findings


# ---- the deployed side ---------------------------------------------------------------------


class Deployed:
    """What CloudFormation and EC2 hold now, through one botocore session."""

    def __init__(self, region: str | None = None) -> None:
        self.session = botocore.session.get_session()
        # botocore reads AWS_DEFAULT_REGION only; the CDK CLI and the other SDKs also read AWS_REGION.
        region = region or self.session.get_config_variable("region") or os.environ.get("AWS_REGION")
        if region:
            self.session.set_config_variable("region", region)
        self._clients: dict[str, Any] = {}

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self.session.create_client(service)
        return self._clients[service]

    def stack(self, stack: str) -> dict[str, Any] | None:
        """The deployed stack (DescribeStacks), or None when there is none to guard."""
        try:
            found = self.client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
        except botocore.exceptions.ClientError as error:
            if "does not exist" in error.response.get("Error", {}).get("Message", ""):
                return None
            raise
        if not found or found[0].get("StackStatus") in ("DELETE_COMPLETE", "ROLLBACK_COMPLETE", "REVIEW_IN_PROGRESS"):
            return None
        return found[0]

    def template(self, stack: str) -> dict[str, Any] | None:
        """The deployed template, or None when there is no stack to guard."""
        if self.stack(stack) is None:
            return None
        body = self.client("cloudformation").get_template(StackName=stack)["TemplateBody"]
        return body if isinstance(body, dict) else json.loads(body)

    def active_runs(self) -> dict[str, str]:
        """Run id -> state of every run the run table holds as active (its sparse index). Only the id and
        the state are read: a record the supervisor would find malformed still counts."""
        storage = self.stack(naming.STORAGE_STACK)
        outputs = {o["OutputKey"]: o.get("OutputValue", "") for o in (storage or {}).get("Outputs", [])}
        table = outputs.get(naming.OUTPUT_RUN_TABLE)
        if not table:
            return {}
        pages = (
            self.client("dynamodb")
            .get_paginator("query")
            .paginate(
                TableName=table,
                IndexName=ACTIVE_INDEX,
                KeyConditionExpression="active = :one",
                ExpressionAttributeValues={":one": {"S": "1"}},
                ProjectionExpression="run_id, #state",
                ExpressionAttributeNames={"#state": "state"},
            )
        )
        runs = {}
        for page in pages:
            for item in page.get("Items", []):
                run_id, state = item.get("run_id", {}).get("S", "?"), item.get("state", {}).get("S", "")
                if state in ACTIVE_STATES:
                    runs[run_id] = state
        return runs

    def live_managed_instances(self) -> dict[str, list[tuple[str, str]]]:
        """Run id -> [(instance id, state)] of the instances tagged managed that are still up."""
        pages = (
            self.client("ec2")
            .get_paginator("describe_instances")
            .paginate(
                Filters=[
                    {"Name": f"tag:{naming.TAG_MANAGED}", "Values": ["true"]},
                    {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
                ]
            )
        )
        instances: dict[str, list[tuple[str, str]]] = {}
        for page in pages:
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    instances.setdefault(tags.get(naming.TAG_RUN_ID) or "?", []).append(
                        (instance["InstanceId"], instance.get("State", {}).get("Name", ""))
                    )
        return instances

    def gang_security_groups(self) -> list[tuple[str, str, str]]:
        """(group id, run id, attempt) of each security group the supervisor made for a gang attempt and has not
        deleted yet (its minute's sweep deletes one once the members' network interfaces are gone)."""
        groups = self.client("ec2").describe_security_groups(Filters=[
            {"Name": f"tag:{naming.TAG_CREATED_BY}", "Values": ["supervisor"]},
            {"Name": "tag-key", "Values": [naming.TAG_ATTEMPT]},
        ])["SecurityGroups"]  # fmt: skip
        found = []
        for group in groups:
            tags = {t["Key"]: t["Value"] for t in group.get("Tags", [])}
            found.append((group["GroupId"], tags.get(naming.TAG_RUN_ID, "?"), tags.get(naming.TAG_ATTEMPT, "?")))
        return sorted(found)

    def ssm_parameters(self, stack: str, template: dict[str, Any]) -> dict[str, tuple[str, str]]:
        """SSM-typed parameters: the value resolved at the last deploy and the one a deploy would resolve now."""
        declared = {
            name: p.get("Default")
            for name, p in (template.get("Parameters") or {}).items()
            if str(p.get("Type", "")).startswith(_SSM_PARAMETER_TYPE)
        }
        if not declared:
            return {}
        stack_parameters = (
            self.client("cloudformation").describe_stacks(StackName=stack)["Stacks"][0].get("Parameters", [])
        )
        resolved = {p["ParameterKey"]: p.get("ResolvedValue") for p in stack_parameters}
        values = {}
        for name, path in declared.items():
            if not resolved.get(name) or not isinstance(path, str):
                continue
            try:
                now = self.client("ssm").get_parameter(Name=path)["Parameter"]["Value"]
            except botocore.exceptions.ClientError:
                continue  # not readable here: CloudFormation will say so itself
            values[name] = (resolved[name], now)
        return values

    def live_instances(self, stack: str) -> dict[str, tuple[str, str, str]]:
        """Logical id -> (instance id, state, run-id tag) for the stack's instances EC2 still knows."""
        pages = self.client("cloudformation").get_paginator("list_stack_resources").paginate(StackName=stack)
        resources = [r for page in pages for r in page["StackResourceSummaries"]]
        by_instance = {
            r["PhysicalResourceId"]: r["LogicalResourceId"]
            for r in resources
            if r.get("ResourceType") == "AWS::EC2::Instance" and r.get("PhysicalResourceId")
        }
        if not by_instance:
            return {}
        live = {}
        for instance_id, logical_id in by_instance.items():
            try:
                reservations = self.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"]
            except botocore.exceptions.ClientError as error:
                if error.response.get("Error", {}).get("Code", "").startswith("InvalidInstanceID"):
                    continue  # gone long ago
                raise
            for reservation in reservations:
                for instance in reservation["Instances"]:
                    state = instance.get("State", {}).get("Name", "")
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    live[logical_id] = (instance_id, state, tags.get(naming.TAG_RUN_ID, ""))
        return live


def check(stacks: list[SynthesizedStack], region: str | None = None) -> list[Finding]:
    """Every finding for these stacks, each read in its own region (or `region`, else the default one)."""
    readers: dict[str | None, Deployed] = {}
    findings: list[Finding] = []
    for stack in stacks:
        where = stack.region or region
        deployed = readers.setdefault(where, Deployed(where))
        current = deployed.template(stack.name)
        if current is None:
            continue
        findings += protected_removals(stack.name, current, stack.template)
        if any(r.get("Type") == "AWS::EC2::Instance" for r in _resources(current).values()):
            live = deployed.live_instances(stack.name)
            parameters = deployed.ssm_parameters(stack.name, stack.template) if live else {}  # also for ended ones
            findings += instance_changes(stack.name, current, stack.template, live, parameters)
    return findings


def active_run_findings(
    runs: dict[str, str], instances: dict[str, list[tuple[str, str]]], stack_instances: Collection[str] = ()
) -> list[Finding]:
    """One finding per managed run that is still going, from its record (`runs`: id -> state), its live
    instances (`instances`: id -> [(instance id, state)]) and which of those the compute stack made."""
    findings = []
    for run_id in sorted(set(runs) | set(instances)):
        seen = [f"run table: {runs[run_id]}"] if run_id in runs else []
        seen += [f"instance {instance_id} {state}" for instance_id, state in instances.get(run_id, [])]
        made = [instance_id for instance_id, _ in instances.get(run_id, []) if instance_id in stack_instances]
        harm = (
            f"terminate its instance {', '.join(made)}"
            if made
            else "take its supervisor, launch templates and instance role from under it"
        )
        findings.append(Finding(naming.COMPUTE_STACK, run_id, (
            f"the run {run_id} is still active ({'; '.join(seen)}) and destroying the compute stack would {harm}; "
            f"stop it (`training-infra stop {run_id}`) and wait until `training-infra status {run_id}` shows it "
            f"ended, or accept with `make destroy {ALLOW_VARIABLE}`"
        )))  # fmt: skip
    return findings


def check_destroy(region: str | None = None) -> list[Finding]:
    """What `make destroy` (the compute stack) would cut short; nothing when the stack is not deployed."""
    deployed = Deployed(region)
    if deployed.stack(naming.COMPUTE_STACK) is None:
        return []
    made = {instance_id for instance_id, *_ in deployed.live_instances(naming.COMPUTE_STACK).values()}
    findings = active_run_findings(deployed.active_runs(), deployed.live_managed_instances(), made)
    return findings + gang_group_findings(deployed.gang_security_groups())


def gang_group_findings(groups: list[tuple[str, str, str]]) -> list[Finding]:
    """A gang's security group outlives the compute stack's supervisor, whose sweep deletes it: in the stack's
    VPC it makes the destroy fail half-way (the VPC has a dependency); in an imported VPC it would be left for good."""
    return [
        Finding(naming.COMPUTE_STACK, group_id, (
            f"security group {group_id} of run {run_id} attempt {attempt}, made by the supervisor for a multi-node "
            "run, still exists: the supervisor deletes it within minutes of the run's end (once its instances' "
            "network interfaces are gone); wait and run `make destroy` again, or delete it yourself: "
            f"`aws ec2 delete-security-group --group-id {group_id}`"
        ))
        for group_id, run_id, attempt in groups
    ]  # fmt: skip


def _print(lines: Iterable[str]) -> None:
    for line in lines:
        sys.stderr.write(line + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training_infra.deploy_guard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "cdk_out", type=Path, nargs="?", help="the cloud assembly `cdk synth` wrote (cdk.out); none with --destroy"
    )
    parser.add_argument(
        "--destroy", action="store_true", help="guard `make destroy` instead: refuse while a managed run is active"
    )
    parser.add_argument(
        "--allow-destructive",
        action="store_true",
        help=f"report the findings but let the deploy or destroy go ahead (`make deploy {ALLOW_VARIABLE}`)",
    )
    parser.add_argument("--report-only", action="store_true", help="report the findings and exit 0 (for `make diff`)")
    parser.add_argument(
        "--region", help="region of environment-agnostic stacks (default: the standard AWS configuration)"
    )
    args = parser.parse_args(argv)
    guard, make = ("destroy guard", "make destroy") if args.destroy else ("deploy guard", "make deploy")
    if args.destroy and args.cdk_out is not None:
        _print([f"error: argument 'cdk_out': got {str(args.cdk_out)!r}; allowed: none with --destroy"])
        return 2
    if not args.destroy and (args.cdk_out is None or not (args.cdk_out / "manifest.json").is_file()):
        got = repr(str(args.cdk_out)) if args.cdk_out is not None else "nothing"
        _print([
            f"error: argument 'cdk_out': got {got}; "
            "allowed: a cloud assembly written by `cdk synth` (with manifest.json)"
        ])  # fmt: skip
        return 2
    from training_infra.cli.errors import describe_aws_error

    try:
        findings = check_destroy(args.region) if args.destroy else check(synthesized_stacks(args.cdk_out), args.region)
    except (
        botocore.exceptions.BotoCoreError,
        botocore.exceptions.ClientError,
        ResponseParserError,
        ValueError,
    ) as error:
        try:
            message = describe_aws_error(error)
        except (ResponseParserError, ValueError):
            message = " ".join(str(error).split())[:300]
        if args.report_only:
            _print([f"{guard}: not checked ({message})"])
            return 0
        what = "the active runs" if args.destroy else "the deployed stacks"
        _print([f"error: {guard} cannot read {what}: {message}"])
        return 1
    if not findings:
        return 0
    if args.report_only:
        _print([f"{guard}: {finding}" for finding in findings])
        _print([f"{guard}: `{make}` would stop here (or go ahead with `{make} {ALLOW_VARIABLE}`)"])
        return 0
    if args.allow_destructive:
        _print([f"{guard}: accepted by {ALLOW_VARIABLE}: {finding}" for finding in findings])
        return 0
    _print([f"error: {guard}: {finding}" for finding in findings])
    done, fix = (
        ("destroyed", "stop the runs above and let them end")
        if args.destroy
        else ("deployed", "fix the settings above")
    )
    _print([f"error: {guard}: nothing was {done}; {fix}, or accept with `{make} {ALLOW_VARIABLE}`"])
    return 3


if __name__ == "__main__":
    sys.exit(main())
