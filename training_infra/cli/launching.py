"""`launch`: a managed run from the compute stack's launch template (docs/architecture.md, "Managed runs").

The CLI validates the options and runs the preflight (read-only, for quick one-line answers), then
asks the supervisor (docs/architecture.md, "Trust boundaries"): an IAM-authenticated invoke of its
function, or on the local AWS, which runs no Lambda, the same handler in this process. The supervisor
checks the request again against the stack's limits, reserves the money, makes the run's launch
template from the stack template's default version, writes the record and starts attempt 1. A user
needs no permission to write the run table, make a template or start an instance.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import botocore.exceptions
import botocore.session

from training_infra import launch_rules, naming, pricing
from training_infra.cli import preflight
from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError, UsageError
from training_infra.cli.runs import iso_z, new_run_id, utcnow
from training_infra.config import Refused

# The rules live in one place, shared with the run spec file (training_infra/spec.py).
_ENV_KEY = launch_rules.ENV_KEY
PARAMETER_PATH = launch_rules.PARAMETER_PATH
_SECRET_REF = launch_rules.SECRET_REF
_RESERVED_NAMES = launch_rules.RESERVED_NAMES
MARKETS = launch_rules.MARKETS
MAX_RESTARTS = launch_rules.MAX_RESTARTS


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
    nodes: str | int | None = None  # a gang of this many instances (issue 25); None: one
    # Where the values came from, weakest first (a spec file or --like, then the flags): cli/spec_cli.py.
    spec_layers: list[tuple[str, dict[str, Any]]] = field(default_factory=list, compare=False)
    data_access: str | None = None  # sync | mount (issue 29): how the run sees data/ at /data
    capacity_reservation: str | None = None  # a Capacity Block the user bought (issue 28): market capacity-block
    nccl_efa_check: bool | None = None  # False: --no-nccl-efa-check (a gang's NCCL-uses-EFA check off); None: on


MIN_COST_USD = launch_rules.MIN_COST_USD


def _positive_usd(option: str, value: Any) -> float:
    try:
        return launch_rules.max_cost_usd(value)
    except Refused as refused:
        raise UsageError(f"option '{option}': got {value!r}; allowed: {refused.allowed}") from None


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
        raise UsageError(
            f"options '--market' and '--{'spot' if request.spot else 'on-demand'}': got both; allowed: one of them"
        )
    if request.market is not None and request.market not in MARKETS:
        raise UsageError(f"option '--market': got {request.market!r}; allowed: {launch_rules.MARKET_ALLOWED}")
    if request.max_restarts_on_errors is not None:
        try:
            request.max_restarts_on_errors = str(launch_rules.restarts(request.max_restarts_on_errors))
        except Refused as refused:
            raise UsageError(
                f"option '--max-restarts-on-errors': got {request.max_restarts_on_errors!r}; allowed: {refused.allowed}"
            ) from None
    if request.max_runtime_hours is not None:
        request.max_runtime_hours = check("max_runtime_hours", "--max-runtime-hours", request.max_runtime_hours)
    if request.max_cost_usd is not None:
        request.max_cost_usd = _positive_usd("--max-cost-usd", request.max_cost_usd)
    if request.stall_minutes is not None:
        request.stall_minutes = check("stall_minutes", "--stall-minutes", request.stall_minutes)
    if request.nodes is not None:  # the max_nodes setting's parser; the stack's own max_nodes is the supervisor's
        request.nodes = check("max_nodes", "--nodes", request.nodes)
    if request.command is not None:
        _check_gang_command(request.command, int(request.nodes or 1), "option '--command'")
    if request.image_tag is not None:
        request.image_tag = check("image_tag", "--image-tag", request.image_tag)
    if request.data_access is not None:
        request.data_access = check("data_access", "--data-access", request.data_access)
    if request.run_id is not None:
        request.run_id = check("run_id", "--run-id", request.run_id) or None
    preflight.check_run_id_name(request.run_id)
    if request.resume and not request.run_id:
        raise UsageError("option '--resume': needs --run-id, the finished run to continue")
    request.max_price = preflight.parse_max_price(request.max_price)
    _check_block(request)
    for item in request.env:
        key, sep, value = item.partition("=")
        try:
            launch_rules.env_key(key if sep else "")
            launch_rules.env_value(value)
        except Refused:
            raise UsageError(
                f"option '--env': got {item!r}; allowed: KEY=VALUE with KEY of letters, digits and '_' "
                "(not starting with a digit) and a one-line VALUE"
            ) from None
    _check_secrets(request)
    _check_gang_env(request)
    if request.subnet_id is not None and not _is_subnet_id(request.subnet_id):
        raise UsageError(
            f"option '--subnet-id': got {request.subnet_id!r}; allowed: a subnet id such as subnet-0123456789abcdef0"
        )
    return request


def _check_gang_env(request: LaunchRequest) -> None:
    """A gang's rendezvous variables are the agent's: a user's PET_NNODES=1 would make node 0 train alone."""
    if int(request.nodes or 1) <= 1:
        return
    from training_infra.compute.agent.ti_agent import torchrun

    for option, names in (("--env", [i.partition("=")[0] for i in request.env]),
                          ("--secret", [s.partition("=")[0] for s in request.secret_refs])):  # fmt: skip
        problem = torchrun.gang_env_problem(names)
        if problem:
            raise UsageError(f"option '{option}': {problem}; allowed: other names (with --nodes "
                             f"{request.nodes}, leave them out)")  # fmt: skip


def _check_gang_command(command: str, nodes: int, what: str) -> None:
    """A gang runs only a command the agent can start as one torchrun job on every node (ti_agent/torchrun.py)."""
    try:
        launch_rules.gang_command(command, nodes)
    except Refused as refused:
        raise UsageError(f"{what}: got {command!r}; allowed: {refused.allowed}") from None


def _check_block(request: LaunchRequest) -> None:
    """--capacity-reservation: the id's shape, and no other market or price cap beside it (a block is prepaid)."""
    if request.capacity_reservation is None:
        return
    from training_infra.supervisor.runtime import blocks

    try:
        blocks.reservation_id(request.capacity_reservation)
    except blocks.BlockRefused as refused:
        raise UsageError(str(refused)) from None
    given = [name for name, value in (("--market", request.market), ("--spot/--on-demand", request.spot),
                                      ("--max-price", request.max_price)) if value is not None]  # fmt: skip
    if given:
        raise UsageError(f"options '--capacity-reservation' and '{given[0]}': got both; allowed: one of them (a block "
                         "is its own market, prepaid)")  # fmt: skip


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
    from training_infra.compute.agent.ti_agent.secrets import secrets_policy

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
    """The `export TI_...=` values the stack baked into the user data (the supervisor's own reader)."""
    from training_infra.supervisor.runtime.run_requests import template_exports as exports

    return exports(user_data)


def stack_template_data(aws: Aws) -> tuple[str, dict[str, Any]]:
    """The stack template's id and its default version's data: what the last deploy made, and what the
    supervisor copies into each run's template (never `$Latest`: a version someone added is not the deploy's)."""
    template_id = aws.output(naming.OUTPUT_LAUNCH_TEMPLATE_ID)
    versions = aws.client("ec2").describe_launch_template_versions(LaunchTemplateId=template_id, Versions=["$Default"])
    if not versions.get("LaunchTemplateVersions"):
        raise CliError(f"launch template {template_id} has no version: redeploy the compute stack (`make deploy`)")
    return template_id, versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]


def _candidate_subnets(aws: Aws, template_data: dict[str, Any], request: LaunchRequest | None) -> list[str]:
    """Where to try: --subnet-id, the stack's subnets, or one subnet per AZ of its security group's VPC."""
    if request is not None and request.subnet_id:
        return [request.subnet_id]
    published = aws.stack_outputs(naming.COMPUTE_STACK).get(naming.OUTPUT_SUBNET_IDS, "")
    if published:
        return [s.strip() for s in published.split(",") if s.strip()]
    groups = template_data.get("SecurityGroupIds") or []
    if not groups:
        return []
    ec2 = aws.client("ec2")
    vpc_ids = {g.get("VpcId") for g in ec2.describe_security_groups(GroupIds=groups[:1])["SecurityGroups"]}
    vpc_ids.discard(None)
    if not vpc_ids:
        return []
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
    chosen: list[str] = []
    for subnet in subnets:
        if subnet["AvailabilityZone"] not in seen:
            seen.add(subnet["AvailabilityZone"])
            chosen.append(subnet["SubnetId"])
    return chosen


@dataclass
class Started:
    run: Any  # training_infra.supervisor.runtime.records.Run (None after --dry-run)
    elapsed_seconds: float
    preflight: Any = None  # training_infra.cli.preflight.Report
    notes: list[str] = field(default_factory=list)  # e.g. the local AWS played the Lambda in this process
    spec: Any = None  # training_infra.spec.LaunchSpec: what was launched, the stack's defaults filled in
    sources: dict[str, str] = field(default_factory=dict)  # where each of its values came from, by key path


def supervisor_with(
    client: Any,
    *,
    table: str,
    outputs_bucket: str,
    topic_arn: str = "",
    monthly_limit_usd: float = 0,
    prices: Any = None,
    **limits: Any,
):
    """The supervisor's own code outside its Lambda (the local AWS, the demo, tests), with the names the
    construct passes it as environment, from `naming`; `limits` are the stack's (SupervisorConfig fields).
    `client(service)` makes clients."""
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
        run_template_prefix=naming.RUN_TEMPLATE_PREFIX,
        created_by_tag=naming.TAG_CREATED_BY,
        **limits,
    )
    clients = Clients(ec2=client("ec2"), dynamodb=client("dynamodb"), s3=client("s3"), sns=client("sns"))
    return Supervisor(clients, config, prices=prices)


def stack_limits(aws: Aws, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stack's limits as the construct gives them to the function's environment, read from the deployed
    stack (outputs and the stack template): what the in-process supervisor of the local AWS checks against."""
    from training_infra import config

    if data is None:
        data = stack_template_data(aws)[1]
    outputs = aws.stack_outputs(naming.COMPUTE_STACK)
    exports = template_exports(base64.b64decode(data.get("UserData") or "").decode())
    seconds = exports.get("TI_MAX_RUNTIME_SECONDS", "")
    return {
        "launch_template_id": aws.output(naming.OUTPUT_LAUNCH_TEMPLATE_ID),
        "subnet_ids": ",".join(_candidate_subnets(aws, data, None)),
        "security_group_id": (data.get("SecurityGroupIds") or [""])[0],
        "instance_profile_arn": data.get("IamInstanceProfile", {}).get("Arn", ""),
        "allowed_instance_types": outputs.get(naming.OUTPUT_ALLOWED_INSTANCE_TYPES)
        or ",".join(config.Settings().allowed_instance_types),
        "max_runtime_hours": int(seconds) / 3600 if seconds.isdigit() else config.Settings().max_runtime_hours,
    }


def supervisor_for(aws: Aws, prices: Any = None, data: dict[str, Any] | None = None):
    """The supervisor as the local AWS plays its Lambda: its code in this process, the limits the construct gives
    the deployed function as environment, read from the deployed stack (moto keeps no function), and the
    function role's credentials when the caller gives them (TI_SUPERVISOR_* variables; else the caller's own)."""
    client = aws.client
    if os.environ.get("TI_SUPERVISOR_ACCESS_KEY_ID"):
        session = botocore.session.get_session()
        session.set_credentials(
            os.environ["TI_SUPERVISOR_ACCESS_KEY_ID"],
            os.environ.get("TI_SUPERVISOR_SECRET_ACCESS_KEY", ""),
            os.environ.get("TI_SUPERVISOR_SESSION_TOKEN") or None,
        )
        session.set_config_variable("region", aws.region_name)
        clients: dict[str, Any] = {}

        def client(service: str) -> Any:
            if service not in clients:
                clients[service] = session.create_client(service)
            return clients[service]

    return supervisor_with(
        client,
        table=aws.output(naming.OUTPUT_RUN_TABLE),
        outputs_bucket=aws.output(naming.OUTPUT_OUTPUTS_BUCKET),
        topic_arn=aws.stack_outputs(naming.SAFETY_STACK).get(naming.OUTPUT_ALERTS_TOPIC_ARN, ""),
        monthly_limit_usd=_monthly_limit(aws),
        prices=prices,
        **stack_limits(aws, data),
        placement_strategy="",  # the local AWS (moto) has no placement groups (docs/architecture.md, gangs)
    )


LOCAL_NOTE = "the local AWS runs no Lambda: the supervisor's handler ran in this process, with the stack's limits"


def is_local(aws: Aws) -> bool:
    """The local AWS (moto on loopback), where no Lambda runs."""
    endpoint = aws.client("cloudformation").meta.endpoint_url or ""
    host = urllib.parse.urlparse(endpoint).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1")


def call_supervisor(aws: Aws, payload: dict[str, Any], *, prices: Any = None, data: Any = None) -> tuple[dict, list]:
    """A launch or stop request to the supervisor: an IAM-authenticated Lambda invoke on AWS; on the local AWS the
    same handler in this process. Its refusal is the command's one-line error (exit 2 for bad input)."""
    notes: list[str] = []
    if is_local(aws):
        from training_infra.supervisor.runtime.run_requests import handle_request

        answer = handle_request(supervisor_for(aws, prices, data), payload)
        notes.append(LOCAL_NOTE)
    else:
        function = aws.output(naming.OUTPUT_SUPERVISOR_FUNCTION)
        try:
            response = aws.client("lambda").invoke(FunctionName=function, Payload=json.dumps(payload).encode())
        except botocore.exceptions.ClientError as error:
            raise CliError(invoke_error(error.response.get("Error", {}))) from None
        body = response["Payload"].read()
        answer = json.loads(body or b"{}")
        if response.get("FunctionError"):
            raise CliError(f"the supervisor failed: {answer.get('errorMessage', body[:300])}")
    if not answer.get("ok"):
        raise (UsageError if answer.get("usage") else CliError)(str(answer.get("error", "refused")))
    return answer, notes


def invoke_error(error: dict[str, Any]) -> str:
    """What AWS said when the invoke was refused, in one line; the policy hint only when it is about permissions (a
    throttled invoke, the function's reserved concurrency of 2, is not)."""
    code, message = error.get("Code", ""), " ".join(str(error.get("Message", "")).split())[:300]
    if code in ("AccessDeniedException", "AccessDenied", "UnauthorizedOperation"):
        return (f"cannot ask the supervisor ({code}): your credentials need the stack's TrainingUserPolicy "
                "(docs/cli.md, 'Permissions the command needs')")  # fmt: skip
    if code in ("TooManyRequestsException", "ThrottlingException"):
        return f"the supervisor is busy ({code}: {message}): try again in a few seconds"
    return f"cannot ask the supervisor: AWS said {code}: {message}"


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
    if request.capacity_reservation:
        return "capacity-block"
    if request.market:
        return request.market
    if request.spot is not None:
        return "spot" if request.spot else "on-demand"
    return "spot" if template_data.get("InstanceMarketOptions", {}).get("MarketType") == "spot" else "on-demand"


def _check_allowed(aws: Aws, types: list[str]) -> None:
    """The stack's allowed_instance_types, as a quick answer (the supervisor refuses them anyway)."""
    from training_infra import config

    published = aws.stack_outputs(naming.COMPUTE_STACK).get(naming.OUTPUT_ALLOWED_INSTANCE_TYPES, "")
    allowed = tuple(t for t in published.split(",") if t) or config.Settings().allowed_instance_types
    refused = [t for t in types if not config.type_allowed(t, allowed)]
    if refused:
        raise UsageError(
            f"option '--instance-types': got {','.join(refused)}; allowed: the stack's allowed_instance_types "
            f"{','.join(allowed)}"
        )


def _stack_hours(exports: dict[str, str]) -> float:
    seconds = exports.get("TI_MAX_RUNTIME_SECONDS", "")
    if seconds.isdigit():
        return int(seconds) / 3600
    from training_infra import config  # a template without the export: the settings' default

    return config.Settings().max_runtime_hours


def _floor_seconds(exports: dict[str, str]) -> int:
    """Boot + one checkpoint interval: the shortest run worth starting (the supervisor's own floor)."""
    from training_infra.supervisor.runtime.supervisor import SupervisorConfig

    boot = SupervisorConfig.__dataclass_fields__["boot_seconds"].default
    return int(boot) + int(exports.get("TI_CHECKPOINT_SYNC_SECONDS", "300") or 300)


def _runtime_hours(request: LaunchRequest, exports: dict[str, str]) -> float:
    """--max-runtime-hours, else the stack's; at least boot + one checkpoint interval, at most the stack's."""
    from training_infra.supervisor.runtime.supervisor import SupervisorConfig

    stack_hours = _stack_hours(exports)
    hours = request.max_runtime_hours if request.max_runtime_hours is not None else stack_hours
    boot = SupervisorConfig.__dataclass_fields__["boot_seconds"].default
    checkpoint = int(exports.get("TI_CHECKPOINT_SYNC_SECONDS", "300") or 300)
    floor = (boot + checkpoint) / 3600
    if not floor <= hours <= stack_hours + 1e-9:
        raise UsageError(
            f"option '--max-runtime-hours': got {hours:g}; allowed: from {floor:g} (boot {boot // 60} min + one "
            f"checkpoint interval {checkpoint}s) up to the stack's max_runtime_hours {stack_hours:g}"
        )
    return hours


# Said at launch and in --dry-run: no Deep Learning AMI release note lists Mountpoint, and the agent
# installs nothing at boot (docs/agent.md, "The cold start": where mount-s3 comes from).
MOUNT_NOTE = (
    "data_access=mount: the AMI (the stack's image_id, else ami_parameter) must provide mount-s3 (Mountpoint for"
    " Amazon S3); the Deep Learning AMIs do not list it and the agent does not install it: without it the attempt"
    " fails before the trainer starts"
)


def launch(aws: Aws, request: LaunchRequest) -> Started:
    started = time.monotonic()
    template_id, data = stack_template_data(aws)
    encoded = data.get("UserData")
    if not encoded:
        raise CliError(f"launch template {template_id} has no user data: redeploy the compute stack (`make deploy`)")
    exports = template_exports(base64.b64decode(encoded).decode())
    if request.command is None and int(request.nodes or 1) > 1:  # the stack's command runs on every node
        _check_gang_command(exports.get("TI_TRAINING_COMMAND", ""), int(request.nodes or 1),
                            "the stack's training_command (give --command)")  # fmt: skip
    run_id = request.run_id or new_run_id()
    hours = _runtime_hours(request, exports)
    types = _instance_types(aws, request)
    _check_allowed(aws, types)
    market = _market(request, data)
    subnets = _candidate_subnets(aws, data, request)
    if not subnets:
        raise CliError(
            f"the compute stack publishes no {naming.OUTPUT_SUBNET_IDS}: "
            "redeploy it (`make deploy`) or pass --subnet-id"
        )
    now = utcnow()
    deadline = iso_z(now + timedelta(hours=hours))
    tags = {**naming.run_tags(run_id, max_runtime_hours=hours, deadline=deadline), "Name": naming.instance_name(run_id)}
    prices = pricing.prices_for(aws)
    store = _store(aws)
    plan = preflight.Plan(
        run_id=run_id, image_tag=request.image_tag or exports.get("TI_IMAGE_TAG", "latest"), instance_types=types,
        market=market, subnets=subnets, deadline=deadline, template_id=template_id,
        run_tags=tags, max_price=request.max_price, allow_empty_data=request.allow_empty_data, resume=request.resume,
        nodes=int(request.nodes or 1), capacity_reservation=request.capacity_reservation or "",
        floor_seconds=_floor_seconds(exports),
    )  # fmt: skip
    checked = preflight.run(aws, plan, prices=prices, store=store, dry_run=request.dry_run)
    types, subnets = plan.instance_types, plan.subnets  # a block narrows them to its type and zone
    list_prices = dict.fromkeys(types, 0.0) if checked.block else checked.list_prices()  # a block is prepaid
    _quick_money_answer(aws, request, types, list_prices, data, hours)
    spec, sources = _resolved_spec(aws, request, data, exports, run_id)
    if (request.data_access or exports.get("TI_DATA_ACCESS") or "sync") == "mount":
        checked.notes.append(MOUNT_NOTE)
    if request.dry_run:
        return Started(
            run=None, elapsed_seconds=time.monotonic() - started, preflight=checked, spec=spec, sources=sources
        )
    payload = {
        "action": "launch", "run_id": run_id, "resume": request.resume, "instance_types": types,
        "subnet_ids": subnets, "market": market, "max_restarts_on_errors": int(request.max_restarts_on_errors or 0),
        "max_runtime_hours": request.max_runtime_hours, "image_tag": request.image_tag, "command": request.command,
        "env": list(request.env), "secrets": list(request.secret_refs),
        "stall_seconds": request.stall_minutes * 60 if request.stall_minutes is not None else None,
        "max_price_usd": request.max_price, "max_cost_usd": request.max_cost_usd, "spec_yaml": spec.to_yaml(),
        **({"nodes": int(request.nodes)} if request.nodes and int(request.nodes) > 1 else {}),
        **({"data_access": request.data_access} if request.data_access is not None else {}),
        **({"nccl_efa_check": False} if request.nccl_efa_check is False else {}),
        **({"capacity_reservation_id": request.capacity_reservation} if request.capacity_reservation else {}),
    }  # fmt: skip
    _answer, notes = call_supervisor(aws, payload, prices=prices, data=data)
    return Started(
        run=store.get(run_id), elapsed_seconds=time.monotonic() - started, preflight=checked, notes=notes, spec=spec,
        sources=sources,
    )  # fmt: skip


def _resolved_spec(
    aws: Aws, request: LaunchRequest, data: dict[str, Any], exports: dict[str, str], run_id: str
) -> tuple[Any, dict[str, str]]:
    """The run's spec as launched: the stack's defaults, then the file (or --like), then the flags."""
    from training_infra.cli import spec_cli

    published = aws.stack_outputs(naming.COMPUTE_STACK).get(naming.OUTPUT_INSTANCE_TYPES, "")
    stack_types = [t.strip() for t in published.split(",") if t.strip()] or _instance_types(aws, request)
    market = "capacity-block" if request.capacity_reservation else _market(LaunchRequest(), data)
    defaults = spec_cli.stack_defaults(stack_types, market, exports, _stack_hours(exports))
    layers = request.spec_layers or [(spec_cli.FLAG, spec_cli.flags_as_spec(request))]
    from training_infra.spec import SpecError

    try:
        return spec_cli.resolved(layers, defaults, run_id)
    except SpecError as error:  # the stack's own defaults refused: a stack this CLI does not know
        raise CliError(f"the resolved spec is not valid: {error}") from None


def _store(aws: Aws) -> Any:
    from training_infra.supervisor.runtime.records import RunStore

    return RunStore(aws.client("dynamodb"), aws.output(naming.OUTPUT_RUN_TABLE))


def _quick_money_answer(
    aws: Aws, request: LaunchRequest, types: list[str], list_prices: dict[str, float], data: dict[str, Any],
    hours: float,
) -> None:  # fmt: skip
    """The dollar limits' usage errors before the request (and with --dry-run); the supervisor decides again."""
    from training_infra.supervisor.runtime.run_requests import Refused, plan_money
    from training_infra.supervisor.runtime.supervisor import SupervisorConfig

    cfg = SupervisorConfig(table="", outputs_bucket="", monthly_limit_usd=_monthly_limit(aws))
    volume_gb = sum(int(m.get("Ebs", {}).get("VolumeSize") or 0) for m in data.get("BlockDeviceMappings", []))
    cost = float(request.max_cost_usd) if request.max_cost_usd is not None else None
    try:
        plan_money(cfg, tuple(types), list_prices, volume_gb, hours, request.max_price, cost, int(request.nodes or 1))
    except Refused as refused:
        raise (UsageError if refused.usage else CliError)(str(refused)) from None
