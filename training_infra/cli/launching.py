"""`launch`: one RunInstances call from the compute stack's launch template.

The instance boots the same agent as `cdk deploy -c create_instance=true`: the template's user
data with per-run overrides (`with_run_overrides`) and the same tags.

Market: RunInstances parameters override the template's, so `--spot` against an on-demand
template is just `InstanceMarketOptions` next to the template reference. The opposite cannot be
expressed (RunInstances has no on-demand MarketType and cannot remove the template's spot
options), so `--on-demand` against a spot template launches WITHOUT the template reference,
passing the template's own data (AMI, security groups, profile, volumes, metadata options,
shutdown behaviour, monitoring, ...) explicitly. Either way the requested market is what runs.
"""

from __future__ import annotations

import base64
import re
import secrets
import shlex
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import botocore.exceptions

from training_infra import naming, pricing
from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError, UsageError
from training_infra.cli.runs import iso_z, new_run_id, utcnow
from training_infra.compute.user_data import OVERRIDES_MARKER, with_run_overrides

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# LaunchTemplateData keys that RunInstances accepts under the same name and shape.
_COPIED_TEMPLATE_KEYS = (
    "ImageId", "InstanceType", "KeyName", "SecurityGroupIds", "SecurityGroups", "IamInstanceProfile",
    "BlockDeviceMappings", "NetworkInterfaces", "MetadataOptions", "InstanceInitiatedShutdownBehavior",
    "Monitoring", "EbsOptimized", "Placement", "CreditSpecification", "CpuOptions", "HibernationOptions",
    "DisableApiTermination", "DisableApiStop", "PrivateDnsNameOptions", "MaintenanceOptions",
    "EnclaveOptions", "CapacityReservationSpecification", "LicenseSpecifications", "KernelId", "RamdiskId",
)  # fmt: skip
# A spot launch with no template spot options behaves like the stack's: one-time, terminate.
_DEFAULT_SPOT = {"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
_CAPACITY_CODES = ("InsufficientInstanceCapacity", "MaxSpotInstanceCountExceeded", "VcpuLimitExceeded", "Unsupported", "SpotMaxPriceTooLow", "InstanceLimitExceeded")


@dataclass
class LaunchRequest:
    """What the user asked for; None means 'as the stack was deployed'."""

    instance_type: str | None = None
    spot: bool | None = None
    max_runtime_hours: float | None = None
    image_tag: str | None = None
    command: str | None = None
    env: list[str] = field(default_factory=list)
    run_id: str | None = None
    subnet_id: str | None = None


@dataclass
class Launched:
    run_id: str
    instance_id: str
    instance_type: str
    market: str
    deadline: str
    availability_zone: str
    from_template: bool


def check(setting: str, option: str, value: Any, *, kind: str = "option") -> Any:
    """Validate with the same parser the CDK settings use, reported against the CLI option."""
    from training_infra import config  # the settings module, loaded only when there is something to check

    try:
        return config.parse_setting(setting, value, label=f"{kind} '{option}'")  # the settings' parsers, not copies
    except config.ConfigError as error:
        raise UsageError(str(error)) from None


def validate(request: LaunchRequest) -> LaunchRequest:
    """Usage errors before any AWS call."""
    if request.instance_type is not None:
        request.instance_type = check("instance_type", "--instance-type", request.instance_type)
    if request.max_runtime_hours is not None:
        request.max_runtime_hours = check("max_runtime_hours", "--max-runtime-hours", request.max_runtime_hours)
    if request.image_tag is not None:
        request.image_tag = check("image_tag", "--image-tag", request.image_tag)
    if request.run_id is not None:
        request.run_id = check("run_id", "--run-id", request.run_id) or None
    for item in request.env:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key) or "\n" in value:
            raise UsageError(f"option '--env': got {item!r}; allowed: KEY=VALUE with KEY of letters, digits and '_' (not starting with a digit) and a one-line VALUE")
    if request.subnet_id is not None and not _is_subnet_id(request.subnet_id):
        raise UsageError(f"option '--subnet-id': got {request.subnet_id!r}; allowed: a subnet id such as subnet-0123456789abcdef0")
    return request


def _is_subnet_id(value: str) -> bool:
    from training_infra import config

    try:
        return config.parse_setting("subnet_ids", value) == (value,)  # one id, parsed as subnet_ids is
    except config.ConfigError:
        return False


def template_exports(user_data: str) -> dict[str, str]:
    """The `export TI_...=` values the stack baked into the user data (before the overrides marker).

    Read as bash would (shell quoting, multi-line values such as TI_EXTRA_ENV).
    """
    lexer = shlex.shlex(user_data.split(OVERRIDES_MARKER, 1)[0], posix=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    values: dict[str, str] = {}
    try:
        words = list(lexer)
    except ValueError:
        return values  # not quoted as render_user_data quotes: use the defaults
    for previous, word in zip(words, words[1:], strict=False):
        name, sep, value = word.partition("=")
        if previous == "export" and sep and name.startswith("TI_"):
            values[name] = value
    return values


def latest_template_data(aws: Aws) -> tuple[str, str, dict[str, Any]]:
    """The template id, its newest version number and that version's data: what the last deploy wrote.

    CloudFormation makes each update the default version, but the local emulator leaves the
    default at 1; reading `$Latest` and launching that exact number is right on both and
    launches the very data read here, even if a deploy adds a version in between.
    """
    template_id = aws.output(naming.OUTPUT_LAUNCH_TEMPLATE_ID)
    versions = aws.client("ec2").describe_launch_template_versions(LaunchTemplateId=template_id, Versions=["$Latest"])
    if not versions.get("LaunchTemplateVersions"):
        raise CliError(f"launch template {template_id} has no version: redeploy the compute stack (`make deploy`)")
    latest = versions["LaunchTemplateVersions"][0]
    return template_id, str(latest["VersionNumber"]), latest["LaunchTemplateData"]


def _overrides(request: LaunchRequest, run_id: str, exports: dict[str, str]) -> dict[str, str]:
    overrides = {"TI_RUN_ID": run_id}
    if request.image_tag is not None:
        overrides["TI_IMAGE_TAG"] = request.image_tag
    if request.command is not None:
        overrides["TI_TRAINING_COMMAND"] = request.command
    if request.max_runtime_hours is not None:
        overrides["TI_MAX_RUNTIME_SECONDS"] = str(round(request.max_runtime_hours * 3600))
    if request.spot is not None:
        overrides["TI_MARKET"] = "spot" if request.spot else "on-demand"
    if request.instance_type is not None:
        price = pricing.on_demand_price(request.instance_type)
        overrides["TI_HOURLY_PRICE_USD"] = f"{price:g}" if price is not None else "0"
    if request.env:
        # The stack's extra env first, so a --env KEY=... given now wins in the trainer.
        lines = [line for line in exports.get("TI_EXTRA_ENV", "").splitlines() if line.strip()]
        overrides["TI_EXTRA_ENV"] = "\n".join([*lines, *request.env])
    return overrides


def _tags(template_data: dict[str, Any], run_id: str, deadline: str, hours: float) -> list[dict[str, Any]]:
    ours = {**naming.run_tags(run_id, max_runtime_hours=hours, deadline=deadline), "Name": naming.instance_name(run_id)}
    # RunInstances tags replace the template's for the same resource type: carry them over.
    specs = []
    for resource in ("instance", "volume"):
        inherited = {
            t["Key"]: t["Value"]
            for spec in template_data.get("TagSpecifications", [])
            if spec.get("ResourceType") == resource
            for t in spec.get("Tags", [])
            if not t["Key"].startswith("aws:")
        }
        merged = {**inherited, **ours}
        specs.append({"ResourceType": resource, "Tags": [{"Key": k, "Value": v} for k, v in merged.items()]})
    return specs


def _candidate_subnets(aws: Aws, template_data: dict[str, Any], request: LaunchRequest) -> list[str | None]:
    """Where to try: --subnet-id, the stack's subnets, the template's network, or one subnet per AZ of its VPC."""
    if request.subnet_id:
        return [request.subnet_id]
    published = aws.stack_outputs(naming.COMPUTE_STACK).get(naming.OUTPUT_SUBNET_IDS, "")
    if published:
        return [s.strip() for s in published.split(",") if s.strip()]
    if template_data.get("NetworkInterfaces") or template_data.get("Placement", {}).get("AvailabilityZone"):
        return [None]
    groups = template_data.get("SecurityGroupIds") or []
    if not groups:
        return [None]  # the account's default VPC, as RunInstances would choose
    ec2 = aws.client("ec2")
    vpc_ids = {g.get("VpcId") for g in ec2.describe_security_groups(GroupIds=groups[:1])["SecurityGroups"]}
    vpc_ids.discard(None)
    if not vpc_ids:
        return [None]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": sorted(vpc_ids)}])["Subnets"]
    # Public subnets first (the stack's default network), one per AZ, most free addresses first.
    subnets.sort(key=lambda s: (not s.get("MapPublicIpOnLaunch", False), -s.get("AvailableIpAddressCount", 0), s["AvailabilityZone"]))
    seen: set[str] = set()
    chosen: list[str | None] = []
    for subnet in subnets:
        if subnet["AvailabilityZone"] not in seen:
            seen.add(subnet["AvailabilityZone"])
            chosen.append(subnet["SubnetId"])
    return chosen or [None]


def build_run_instances(
    template_id: str, template_data: dict[str, Any], request: LaunchRequest, run_id: str, user_data: str, tags: list[dict[str, Any]],
    version: str = "$Latest",
) -> tuple[dict[str, Any], str, bool]:
    """The RunInstances parameters, the market they give, and whether the template is referenced."""
    template_market = template_data.get("InstanceMarketOptions") or {}
    template_spot = template_market.get("MarketType") == "spot"
    want_spot = template_spot if request.spot is None else request.spot
    params: dict[str, Any] = {
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": user_data,
        "TagSpecifications": tags,
        # Idempotent across botocore's retries of this call; unique per launch; EC2 allows 64 characters.
        "ClientToken": f"{run_id[:55]}-{secrets.token_hex(4)}",
    }
    from_template = want_spot or not template_spot
    if from_template:
        params["LaunchTemplate"] = {"LaunchTemplateId": template_id, "Version": version}
        if want_spot:
            # Explicit even when the template has it: the instance is spot either way, and the
            # template's own spot options (max price, interruption behaviour) are kept.
            params["InstanceMarketOptions"] = template_market if template_spot else _DEFAULT_SPOT
    else:
        for key in _COPIED_TEMPLATE_KEYS:
            if key in template_data:
                params[key] = template_data[key]
        if "MetadataOptions" in params:
            params["MetadataOptions"] = {k: v for k, v in params["MetadataOptions"].items() if k != "State"}
    if request.instance_type:
        params["InstanceType"] = request.instance_type
    return params, ("spot" if want_spot else "on-demand"), from_template


def capacity_hint(code: str, message: str, instance_type: str, market: str, region: str, zones: list[str]) -> str:
    """One line for the errors that mean 'not now, not here, or not with this quota'."""
    where = ", ".join(z for z in zones if z) or region
    other_market = "--on-demand" if market == "spot" else "--spot"
    if code == "InsufficientInstanceCapacity":
        return (f"AWS has no spare {market} capacity for {instance_type} in {where} right now: try another zone "
                f"(--subnet-id), another type (--instance-type), {other_market}, or again in a few minutes")
    if code == "MaxSpotInstanceCountExceeded":
        return ("the account's spot instance limit is reached: end other runs (`training-infra status`, `stop`), "
                "launch with --on-demand, or request a higher spot quota in Service Quotas")
    if code in ("VcpuLimitExceeded", "InstanceLimitExceeded"):
        kind = "Spot Instance Requests" if market == "spot" else "Running On-Demand instances"
        return (f"the {market} vCPU quota in {region} is too low for {instance_type} ({message}): request an "
                f"increase in Service Quotas (EC2 '{kind}' for this family), pick a smaller type, or try {other_market}")
    if code == "Unsupported":
        return f"{instance_type} is not offered in {where} ({message}): try another zone (--subnet-id) or another type"
    return f"the spot price is above the template's max price ({message}): raise spot_max_price, retry later, or use --on-demand"


def launch(aws: Aws, request: LaunchRequest) -> Launched:
    template_id, version, data = latest_template_data(aws)
    encoded = data.get("UserData")
    if not encoded:
        raise CliError(f"launch template {template_id} has no user data: redeploy the compute stack (`make deploy`)")
    base_user_data = base64.b64decode(encoded).decode()
    exports = template_exports(base_user_data)
    run_id = request.run_id or new_run_id()
    hours = request.max_runtime_hours
    if hours is None:
        seconds = exports.get("TI_MAX_RUNTIME_SECONDS", "")
        if seconds.isdigit():
            hours = int(seconds) / 3600
        else:
            from training_infra import config  # a template without the export: the settings' default

            hours = config.Settings().max_runtime_hours
    try:
        user_data = with_run_overrides(base_user_data, _overrides(request, run_id, exports))
    except ValueError as error:
        raise CliError(f"cannot add the run settings to the template's user data: {error}") from None
    now = utcnow()
    deadline = iso_z(now + timedelta(hours=hours))
    params, market, from_template = build_run_instances(template_id, data, request, run_id, user_data, _tags(data, run_id, deadline, hours), version)
    instance_type = params.get("InstanceType") or data.get("InstanceType") or "?"
    ec2 = aws.client("ec2")
    tried: list[str] = []
    subnets = _candidate_subnets(aws, data, request)
    for index, subnet in enumerate(subnets):
        attempt = dict(params)
        if subnet:
            if "NetworkInterfaces" in attempt:
                attempt["NetworkInterfaces"] = [{**nic, "SubnetId": subnet} if nic.get("DeviceIndex", 0) == 0 else nic for nic in attempt["NetworkInterfaces"]]
            else:
                attempt["SubnetId"] = subnet
        try:
            instance = ec2.run_instances(**attempt)["Instances"][0]
        except botocore.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code not in _CAPACITY_CODES:
                raise
            tried.append(_zone_of(aws, subnet))
            if code == "InsufficientInstanceCapacity" and index + 1 < len(subnets):
                continue  # the next zone may have capacity: that is what a person would try first
            raise CliError(capacity_hint(code, error.response["Error"].get("Message", ""), instance_type, market, aws.region_name, tried)) from None
        return Launched(
            run_id=run_id,
            instance_id=instance["InstanceId"],
            instance_type=instance.get("InstanceType", instance_type),
            market=market,
            deadline=deadline,
            availability_zone=instance.get("Placement", {}).get("AvailabilityZone", ""),
            from_template=from_template,
        )
    raise CliError("no subnet to launch into")  # unreachable: _candidate_subnets is never empty


def _zone_of(aws: Aws, subnet: str | None) -> str:
    if not subnet:
        return ""
    try:
        return aws.client("ec2").describe_subnets(SubnetIds=[subnet])["Subnets"][0]["AvailabilityZone"]
    except (botocore.exceptions.ClientError, IndexError, KeyError):
        return subnet
