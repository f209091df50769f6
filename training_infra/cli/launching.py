"""`launch`: a managed run from the compute stack's launch template (docs/architecture.md, "Managed runs").

One call makes three things and hands over: the run's own launch template (the stack template's
newest data with this run's settings in the user data, no market: the fleet chooses), the run
record (spec, one absolute deadline), and attempt 1, started by the supervisor's own code in this
process (one EC2 Fleet over every type x subnet). From then on the supervisor Lambda keeps the run
going; `stop` asks it to end the run gracefully.

The instance boots the same agent as `cdk deploy -c create_instance=true`: the template's user
data with per-run overrides (`with_run_overrides`).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import shlex
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import botocore.exceptions

from training_infra import naming, pricing
from training_infra.cli import preflight
from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError, UsageError
from training_infra.cli.runs import iso_z, new_run_id, utcnow
from training_infra.compute.user_data import OVERRIDES_MARKER, with_run_overrides

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What the secrets reader role may read (the compute construct): SecureStrings under PARAMETER_PATH,
# and Secrets Manager secrets tagged training-infra:managed=true (their ARN is all we can check here).
PARAMETER_PATH = naming.SECRETS_PARAMETER_PATH
_SECRET_REF = re.compile(
    rf"^ssm:{re.escape(PARAMETER_PATH)}[A-Za-z0-9_.\-/]{{1,1000}}$"
    r"|^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]{1,512}$"
)
# The contract's own variables, and the AWS_/TI_ families the agent sets: a secret must not shadow them.
_RESERVED_NAMES = ("RUN_ID", "DATA_DIR", "OUTPUT_DIR", "CHECKPOINT_DIR", "HEARTBEAT_FILE", "STOP_GRACE_SECONDS")
# LaunchTemplateData keys that RunInstances accepts under the same name and shape.
_COPIED_TEMPLATE_KEYS = (
    "ImageId", "InstanceType", "KeyName", "SecurityGroupIds", "SecurityGroups", "IamInstanceProfile",
    "BlockDeviceMappings", "NetworkInterfaces", "MetadataOptions", "InstanceInitiatedShutdownBehavior",
    "Monitoring", "EbsOptimized", "Placement", "CreditSpecification", "CpuOptions", "HibernationOptions",
    "DisableApiTermination", "DisableApiStop", "PrivateDnsNameOptions", "MaintenanceOptions",
    "EnclaveOptions", "CapacityReservationSpecification", "LicenseSpecifications", "KernelId", "RamdiskId",
)  # fmt: skip


MARKETS = ("spot", "on-demand", "spot-then-on-demand")
MAX_RESTARTS = 100


@dataclass
class LaunchRequest:
    """What the user asked for; None means 'as the stack was deployed'."""

    instance_type: str | None = None
    instance_types: str | None = None  # comma-separated, as typed
    market: str | None = None
    max_restarts_on_errors: str | None = None
    spot: bool | None = None
    max_runtime_hours: float | None = None
    stall_minutes: int | None = None
    image_tag: str | None = None
    command: str | None = None
    env: list[str] = field(default_factory=list)
    secret_refs: list[str] = field(default_factory=list)  # NAME=ssm:/path or NAME=arn:...:secretsmanager:...
    run_id: str | None = None
    subnet_id: str | None = None
    max_price: str | float | None = None  # USD/hour cap on every attempt (issue 11)
    dry_run: bool = False  # stop after the preflight
    allow_empty_data: bool = False
    resume: bool = False  # continue a finished run (same id, its checkpoints) with new attempts
    max_cost_usd: str | float | None = None  # USD across every attempt; stopped gracefully before it


def _positive_usd(option: str, value: Any) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if not (0 < number <= 1_000_000):  # also refuses nan and inf
        raise UsageError(f"option '{option}': got {value!r}; allowed: a number of US dollars greater than 0")
    return number


def check(setting: str, option: str, value: Any, *, kind: str = "option") -> Any:
    """Validate with the same parser the CDK settings use, reported against the CLI option."""
    from training_infra import config  # the settings module, loaded only when there is something to check

    try:
        return config.parse_setting(setting, value, label=f"{kind} '{option}'")  # the settings' parsers, not copies
    except config.ConfigError as error:
        raise UsageError(str(error)) from None


def validate(request: LaunchRequest) -> LaunchRequest:
    """Usage errors before any AWS call."""
    if request.instance_type is not None and request.instance_types is not None:
        raise UsageError("options '--instance-type' and '--instance-types': give one (a single type is a list of one)")
    if request.instance_type is not None:
        request.instance_type = check("instance_type", "--instance-type", request.instance_type)
    if request.instance_types is not None:
        types = check("instance_types", "--instance-types", request.instance_types)
        if not types:
            raise UsageError(
                f"option '--instance-types': got {request.instance_types!r}; "
                "allowed: one or more instance types, e.g. g5.xlarge,g6.xlarge"
            )
        request.instance_types = ",".join(types)
    if request.market is not None and request.spot is not None:
        raise UsageError("options '--market' and '--spot/--on-demand': give one")
    if request.market is not None and request.market not in MARKETS:
        raise UsageError(f"option '--market': got {request.market!r}; allowed: {', '.join(MARKETS)}")
    if request.max_restarts_on_errors is not None:
        text = str(request.max_restarts_on_errors).strip()
        if not text.isdigit() or int(text) > MAX_RESTARTS:
            raise UsageError(
                f"option '--max-restarts-on-errors': got {request.max_restarts_on_errors!r}; "
                f"allowed: a whole number from 0 to {MAX_RESTARTS}"
            )
        request.max_restarts_on_errors = text
    if request.max_runtime_hours is not None:
        request.max_runtime_hours = check("max_runtime_hours", "--max-runtime-hours", request.max_runtime_hours)
    if request.max_cost_usd is not None:
        request.max_cost_usd = _positive_usd("--max-cost-usd", request.max_cost_usd)
    if request.stall_minutes is not None:
        request.stall_minutes = check("stall_minutes", "--stall-minutes", request.stall_minutes)
    if request.image_tag is not None:
        request.image_tag = check("image_tag", "--image-tag", request.image_tag)
    if request.run_id is not None:
        request.run_id = check("run_id", "--run-id", request.run_id) or None
    preflight.check_run_id_name(request.run_id)
    if request.resume and not request.run_id:
        raise UsageError("option '--resume': needs --run-id, the finished run to continue")
    request.max_price = preflight.parse_max_price(request.max_price)
    for item in request.env:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key) or "\n" in value:
            raise UsageError(
                f"option '--env': got {item!r}; allowed: KEY=VALUE with KEY of letters, digits and '_' "
                "(not starting with a digit) and a one-line VALUE"
            )
    _check_secrets(request)
    if request.subnet_id is not None and not _is_subnet_id(request.subnet_id):
        raise UsageError(
            f"option '--subnet-id': got {request.subnet_id!r}; allowed: a subnet id such as subnet-0123456789abcdef0"
        )
    return request


def _check_secrets(request: LaunchRequest) -> None:
    """Every bad --secret at once, one line each: names and references only, a value is never given here."""
    env_names = {item.partition("=")[0] for item in request.env}
    seen: set[str] = set()
    problems = []
    for item in request.secret_refs:
        name, sep, ref = item.partition("=")
        if not sep or not _ENV_KEY.match(name) or not _SECRET_REF.match(ref):
            problems.append(
                f"option '--secret': got {item!r}; allowed: NAME=ssm:{PARAMETER_PATH}PATH (an SSM SecureString) "
                "or NAME=arn:aws:secretsmanager:REGION:ACCOUNT:secret:ID (tagged training-infra:managed=true)"
            )
        elif name in _RESERVED_NAMES or name.startswith(("AWS_", "TI_")):
            problems.append(
                f"option '--secret': got name {name!r}; allowed: any name but {', '.join(_RESERVED_NAMES)}, AWS_* "
                f"and TI_*"
            )
        elif name in seen or name in env_names:
            problems.append(f"option '--secret': got name {name!r} twice (or also in --env); allowed: each name once")
        seen.add(name)
    if not problems and request.secret_refs:
        problems += _secrets_policy_too_long(request.secret_refs)
    if problems:
        raise UsageError("\n".join(problems))


# STS refuses a session policy longer than this; the agent sends the reader role one per run.
SESSION_POLICY_LIMIT = 2048


def _secrets_policy_too_long(refs: list[str]) -> list[str]:
    """The policy the agent will send, built by its own function, with the longest account and region."""
    from training_infra.compute.agent.agent_tools import secrets_policy

    policy = secrets_policy(refs, role_arn="arn:aws:iam::123456789012:role/reader", region="ap-southeast-4")
    size = len(json.dumps(policy, separators=(",", ":")))
    if size <= SESSION_POLICY_LIMIT:
        return []
    return [
        f"option '--secret': got {len(refs)} references whose reader policy is {size} characters; allowed: at most "
        f"{SESSION_POLICY_LIMIT} (STS's limit for a session policy): give fewer, or full Secrets Manager ARNs"
    ]


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
    lexer = shlex.shlex(user_data.rsplit(f"\n{OVERRIDES_MARKER}\n", 1)[0], posix=True)
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
    if request.stall_minutes is not None:
        overrides["TI_STALL_SECONDS"] = str(request.stall_minutes * 60)
    if request.env:
        # The stack's extra env first, so a --env KEY=... given now wins in the trainer.
        lines = [line for line in exports.get("TI_EXTRA_ENV", "").splitlines() if line.strip()]
        overrides["TI_EXTRA_ENV"] = "\n".join([*lines, *request.env])
    if request.secret_refs:
        overrides["TI_SECRETS"] = "\n".join(request.secret_refs)  # references only: the agent fetches the values
    return overrides


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
    subnets.sort(
        key=lambda s: (
            not s.get("MapPublicIpOnLaunch", False),
            -s.get("AvailableIpAddressCount", 0),
            s["AvailabilityZone"],
        )
    )
    seen: set[str] = set()
    chosen: list[str | None] = []
    for subnet in subnets:
        if subnet["AvailabilityZone"] not in seen:
            seen.add(subnet["AvailabilityZone"])
            chosen.append(subnet["SubnetId"])
    return chosen or [None]


# LaunchTemplateData keys the run's own template keeps; the market and type are the fleet's to choose.
_RUN_TEMPLATE_KEYS = tuple(key for key in _COPIED_TEMPLATE_KEYS if key not in ("InstanceType", "Placement"))


@dataclass
class Started:
    run: Any  # training_infra.supervisor.runtime.records.Run (None after --dry-run)
    elapsed_seconds: float
    preflight: Any = None  # training_infra.cli.preflight.Report


def supervisor_with(
    client: Any,
    *,
    table: str,
    outputs_bucket: str,
    topic_arn: str = "",
    monthly_limit_usd: float = 0,
    prices: Any = None,
):
    """The supervisor's own code outside its Lambda (the CLI's first launch and stop, the local demo),
    with the names the construct passes it as environment, from `naming`. `client(service)` makes clients."""
    from training_infra.supervisor.runtime.supervisor import Clients, Supervisor, SupervisorConfig

    config = SupervisorConfig(
        table=table,
        outputs_bucket=outputs_bucket,
        topic_arn=topic_arn,
        managed_tag=naming.TAG_MANAGED,
        run_id_tag=naming.TAG_RUN_ID,
        attempt_tag=naming.TAG_ATTEMPT,
        deadline_tag=naming.TAG_DEADLINE,
        max_runtime_tag=naming.TAG_MAX_RUNTIME_HOURS,
        stop_tag=naming.TAG_STOP,
        runs_prefix=naming.RUNS_PREFIX,
        metric_namespace=naming.METRIC_NAMESPACE,
        monthly_limit_usd=monthly_limit_usd,
    )
    clients = Clients(ec2=client("ec2"), dynamodb=client("dynamodb"), s3=client("s3"), sns=client("sns"))
    return Supervisor(clients, config, prices=prices)


def supervisor_for(aws: Aws, prices: Any = None):
    """The supervisor with this user's credentials: the first launch is the same decision as every relaunch."""
    return supervisor_with(
        aws.client,
        table=aws.output(naming.OUTPUT_RUN_TABLE),
        outputs_bucket=aws.output(naming.OUTPUT_OUTPUTS_BUCKET),
        topic_arn=aws.stack_outputs(naming.SAFETY_STACK).get(naming.OUTPUT_ALERTS_TOPIC_ARN, ""),
        monthly_limit_usd=_monthly_limit(aws),
        prices=prices,
    )


def _monthly_limit(aws: Aws) -> float:
    """The deployed monthly_limit_usd (0: none, or a stack from before the setting)."""
    try:
        return float(aws.stack_outputs(naming.COMPUTE_STACK).get(naming.OUTPUT_MONTHLY_LIMIT_USD) or 0)
    except ValueError:
        return 0.0


def _instance_types(aws: Aws, request: LaunchRequest) -> list[str]:
    if request.instance_types:
        return request.instance_types.split(",")
    if request.instance_type:
        return [request.instance_type]
    published = aws.stack_outputs(naming.COMPUTE_STACK).get(naming.OUTPUT_INSTANCE_TYPES, "")
    types = [t.strip() for t in published.split(",") if t.strip()]
    if not types:
        raise CliError(
            f"the compute stack publishes no {naming.OUTPUT_INSTANCE_TYPES}: "
            "redeploy it (`make deploy`) or pass --instance-types"
        )
    return types


def _market(request: LaunchRequest, template_data: dict[str, Any]) -> str:
    """--market, else --spot/--on-demand, else the stack's use_spot (its template's market)."""
    if request.market:
        return request.market
    if request.spot is not None:
        return "spot" if request.spot else "on-demand"
    return "spot" if template_data.get("InstanceMarketOptions", {}).get("MarketType") == "spot" else "on-demand"


def _run_template(aws: Aws, run_id: str, data: dict[str, Any], user_data: str, run_tags: dict[str, str]) -> str:
    """The run's own launch template: the stack template's data, this run's user data and tags, no market.

    Its tags reach every attempt's instance and volume (an instant fleet tags only instances, with
    the attempt number on top).
    """
    run_data = {key: data[key] for key in _RUN_TEMPLATE_KEYS if key in data}
    if "MetadataOptions" in run_data:
        run_data["MetadataOptions"] = {k: v for k, v in run_data["MetadataOptions"].items() if k != "State"}
    run_data["UserData"] = base64.b64encode(user_data.encode()).decode()
    for resource in ("instance", "volume"):
        inherited = {
            t["Key"]: t["Value"]
            for spec in data.get("TagSpecifications", [])
            if spec.get("ResourceType") == resource
            for t in spec.get("Tags", [])
            if not t["Key"].startswith("aws:")
        }
        run_data.setdefault("TagSpecifications", []).append(
            {"ResourceType": resource, "Tags": [{"Key": k, "Value": v} for k, v in {**inherited, **run_tags}.items()]}
        )
    tags = [{"Key": key, "Value": value} for key, value in run_tags.items()]
    try:
        created = aws.client("ec2").create_launch_template(
            LaunchTemplateName=f"{naming.PROJECT}-run-{run_id}",
            LaunchTemplateData=run_data,
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": tags}],
            ClientToken=f"{run_id[:50]}-{secrets.token_hex(4)}",
        )
    except botocore.exceptions.ClientError as error:
        if "AlreadyExists" in error.response.get("Error", {}).get("Code", ""):
            raise CliError(
                f"run {run_id} already exists: choose another --run-id (`training-infra status {run_id}` shows it)"
            ) from None
        raise
    return created["LaunchTemplate"]["LaunchTemplateId"]


def launch(aws: Aws, request: LaunchRequest) -> Started:
    started = time.monotonic()
    template_id, template_version, data = latest_template_data(aws)
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
    types = _instance_types(aws, request)
    market = _market(request, data)
    subnets = [s for s in _candidate_subnets(aws, data, request) if s]
    if not subnets:
        raise CliError(
            f"the compute stack publishes no {naming.OUTPUT_SUBNET_IDS}: "
            "redeploy it (`make deploy`) or pass --subnet-id"
        )
    now = utcnow()
    deadline = iso_z(now + timedelta(hours=hours))
    tags = {**naming.run_tags(run_id, max_runtime_hours=hours, deadline=deadline), "Name": naming.instance_name(run_id)}
    prices = pricing.prices_for(aws)
    supervisor = supervisor_for(aws, prices)
    plan = preflight.Plan(
        run_id=run_id, image_tag=request.image_tag or exports.get("TI_IMAGE_TAG", "latest"), instance_types=types,
        market=market, subnets=subnets, deadline=deadline, template_id=template_id, template_version=template_version,
        run_tags=tags, max_price=request.max_price, allow_empty_data=request.allow_empty_data, resume=request.resume,
    )  # fmt: skip
    checked = preflight.run(aws, plan, prices=prices, store=supervisor.store, dry_run=request.dry_run)
    list_prices = checked.list_prices()  # from the Price List API (the built-in table where it cannot answer)
    volume_gb = sum(int(m.get("Ebs", {}).get("VolumeSize") or 0) for m in data.get("BlockDeviceMappings", []))
    money = _money(request, supervisor, types, list_prices, volume_gb, hours)
    if request.dry_run:
        return Started(run=None, elapsed_seconds=time.monotonic() - started, preflight=checked)
    overrides = _overrides(request, run_id, exports)
    overrides["TI_DEADLINE_AT"] = deadline  # one absolute deadline for every attempt
    overrides["TI_MARKET"] = "on-demand" if market == "on-demand" else "spot"
    hourly = checked.highest_list_price()
    overrides["TI_HOURLY_PRICE_USD"] = f"{hourly:g}" if hourly else "0"  # an upper bound: dearest list price or cap
    try:
        user_data = with_run_overrides(base_user_data, overrides)
    except ValueError as error:
        raise CliError(f"cannot add the run settings to the template's user data: {error}") from None
    month = money.reserve(supervisor, run_id, now)
    try:
        # The supervisor's stall backstop (0: off); the agent has the same value in its user data.
        stall_seconds = int(overrides.get("TI_STALL_SECONDS") or exports.get("TI_STALL_SECONDS") or 0)
        chosen = {"instance_types": types, "subnet_ids": subnets, "market": market, "list_prices": list_prices,
                  "volume_gb": volume_gb, "stall_seconds": stall_seconds, **money.spec(month)}  # fmt: skip
        return _start(aws, supervisor, request, run_id, now, hours, deadline, data, user_data, exports, chosen,
                      started, checked)  # fmt: skip
    except BaseException:
        # A run that never started holds none of the month's dollars; one whose instance started keeps
        # its reservation (the supervisor goes on with it and settles it when it ends).
        record = supervisor.store.get(run_id) if month else None
        if month and (record is None or not (record.active or any(a.get("instance_id") for a in record.attempts))):
            money.release(supervisor, run_id, month)
        raise


@dataclass(frozen=True)
class _Money:
    """A run's dollar limits, checked before anything is created (issue 11; docs/architecture.md, "Dollar limits")."""

    max_cost_usd: float | None
    reserve_usd: float  # what the month's ledger must hold for this run; 0 without a monthly limit
    why: str

    def reserve(self, supervisor: Any, run_id: str, now: Any) -> str:
        from training_infra.supervisor.runtime.records import MonthlyLedger, OverLimit, StaleRecord

        month = MonthlyLedger.key(now)
        if self.reserve_usd <= 0:
            return ""
        try:
            supervisor.month_ledger().reserve(month, run_id, self.reserve_usd, self.why)
        except StaleRecord:
            raise CliError(
                f"run {run_id} is being launched by someone else right now: choose another --run-id"
            ) from None
        except OverLimit as refused:
            raise CliError(
                f"launch refused: {refused}; set a lower --max-cost-usd or --max-runtime-hours, "
                "or raise monthly_limit_usd"
            ) from None
        return month

    def release(self, supervisor: Any, run_id: str, month: str) -> None:
        if month:
            supervisor.month_ledger().settle(month, run_id, 0.0)

    def spec(self, month: str) -> dict[str, Any]:
        limits: dict[str, Any] = {}
        if self.max_cost_usd is not None:
            limits["max_cost_usd"] = self.max_cost_usd
        if month:
            limits.update(budget_month=month, reserved_usd=round(self.reserve_usd, 4))
        return limits


def _money(
    request: LaunchRequest,
    supervisor: Any,
    types: list[str],
    list_prices: dict[str, float],
    volume_gb: int,
    hours: float,
) -> _Money:
    """The run's limit must leave room for one graceful stop; the month's limit needs a price to reserve with."""
    from training_infra.supervisor.runtime import ledger

    volume_hourly = ledger.volume_usd_per_hour({"volume_gb": volume_gb})
    unpriced = [t for t in types if t not in list_prices]
    if unpriced and request.max_price is not None:
        list_prices = {**list_prices, **{t: float(request.max_price) for t in unpriced}}  # the cap bounds them
    elif unpriced and (request.max_cost_usd is not None or supervisor.cfg.monthly_limit_usd):
        what = "option '--max-cost-usd'" if request.max_cost_usd is not None else "setting 'monthly_limit_usd'"
        raise CliError(
            f"{what}: no price is known for {', '.join(unpriced)} (AWS Price List or the built-in table), so its "
            "spend cannot be tracked; allowed: types with a known price, or --max-price to bound them"
        )
    dearest = max(list_prices, key=list_prices.__getitem__) if list_prices else ""
    compute = list_prices[dearest] if dearest else 0.0
    if request.max_price is not None and dearest:
        compute = min(compute, float(request.max_price))  # no attempt may run dearer than the cap
    hourly = compute + volume_hourly
    limit = float(request.max_cost_usd) if request.max_cost_usd is not None else None
    grace_minutes = supervisor.cfg.stop_timeout_seconds / 60
    grace = hourly * supervisor.cfg.grace_hours
    if limit is not None and dearest and limit <= grace:
        raise UsageError(
            f"option '--max-cost-usd': got {limit:g}; allowed: more than one graceful stop's cost, ${grace:.2f} "
            f"({dearest} at ${hourly:.3f}/hour for {grace_minutes:g} min)"
        )
    if not supervisor.cfg.monthly_limit_usd:
        return _Money(limit, 0.0, "")
    worst = hourly * hours
    if limit is None and not dearest:
        raise CliError(
            f"monthly_limit_usd is set and no list price is known for {', '.join(types)}: "
            "pass --max-cost-usd so the launch can reserve what the run may cost"
        )
    if limit is not None and (not dearest or limit < worst):
        return _Money(limit, limit, f"its --max-cost-usd {limit:g}")
    return _Money(limit, worst, f"{dearest} at ${hourly:.3f}/hour for {hours:g} h")


def _start(
    aws: Aws,
    supervisor: Any,
    request: LaunchRequest,
    run_id: str,
    now: Any,
    hours: float,
    deadline: str,
    data: dict[str, Any],
    user_data: str,
    exports: dict[str, str],
    chosen: dict[str, Any],
    started: float,
    checked: preflight.Report,
) -> Started:
    from training_infra.supervisor.runtime.records import Run, StaleRecord

    tags = {**naming.run_tags(run_id, max_runtime_hours=hours, deadline=deadline), "Name": naming.instance_name(run_id)}
    run_template = _run_template(aws, run_id, data, user_data, tags)
    spec = {
        "instance_tags": tags,
        "max_restarts_on_errors": int(request.max_restarts_on_errors or 0),
        "launch_template_id": run_template,
        "launch_template_version": "1",
        "owns_launch_template": True,
        "max_runtime_hours": hours,
        "checkpoint_sync_seconds": int(exports.get("TI_CHECKPOINT_SYNC_SECONDS", "300") or 300),
        "image_tag": request.image_tag or exports.get("TI_IMAGE_TAG", ""),
        "command": request.command if request.command is not None else exports.get("TI_TRAINING_COMMAND", ""),
        # types, subnets, market; list prices and volume (what ledger.py prices attempts with); the dollar limits
        **chosen,
    }
    if request.max_price:
        spec["max_price_usd"] = request.max_price
    record = Run(run_id=run_id, spec=spec, created_at=iso_z(now), deadline_at=deadline)
    try:
        if checked.resumed is not None:
            _reopen(supervisor, checked.resumed, spec, deadline)
        else:
            supervisor.store.create(record)
    except StaleRecord:
        aws.client("ec2").delete_launch_template(LaunchTemplateId=run_template)
        if checked.resumed is not None:
            raise CliError(
                f"run {run_id} changed while it was being resumed: see `training-infra status {run_id}`"
            ) from None
        raise CliError(
            f"run {run_id} already exists: choose another --run-id (`training-infra status {run_id}` shows it)"
        ) from None
    try:
        supervisor.reconcile(run_id)
    except Exception:
        # Nothing half done: a run whose first launch could not even be tried is not left for the
        # supervisor to start a minute later behind the user's back.
        _abandon(supervisor, run_id)
        raise
    return Started(run=supervisor.store.get(run_id), elapsed_seconds=time.monotonic() - started, preflight=checked)


def _reopen(supervisor: Any, finished: Any, spec: dict[str, Any], deadline: str) -> None:
    """`--resume`: the finished run's record goes on with this launch's spec and deadline.

    Its attempts stay (the next is numbered after them, so nothing in runs/<id>/attempts/ is
    overwritten) and the agent restores checkpoints/<id>/ as for any attempt. A conditional write:
    a run someone changed since the preflight read it is refused as in use.
    """
    # Its limits count from here: what it spent before was settled in its month when it ended.
    spec = {**spec, "spent_before_usd": round(float(finished.spent_usd or 0), 4)}
    finished.spec, finished.deadline_at, finished.state = spec, deadline, "launching"
    finished.message, finished.ended_at, finished.errors_used, finished.cooldown = "resumed", "", 0, {}
    finished.stop_requested_at = finished.stop_reason = ""
    supervisor.store.save(finished)


def _abandon(supervisor: Any, run_id: str) -> None:
    from training_infra.supervisor.runtime.records import StaleRecord

    record = supervisor.store.get(run_id)
    if record is None or not record.active or (record.current or {}).get("instance_id"):
        return  # an instance started: the supervisor keeps the run (and its reservation)
    record.state, record.message = "failed", "launch failed before any instance started (see the error launch printed)"
    try:
        supervisor.store.save(record)
        supervisor.clients.ec2.delete_launch_template(LaunchTemplateId=record.spec["launch_template_id"])
    except (StaleRecord, botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
        pass  # the error the user sees is the one that stopped the launch
