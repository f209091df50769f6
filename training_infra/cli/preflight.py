"""Preflight: refuse a launch that cannot work before anything is created or billed (issue 11).

`launch` runs it after reading the stack and before making the run's template, record or
instance; `launch --dry-run` stops after it and prints what it would do. Every failure is one
line that says what is wrong and how to fix it; they are all reported at once (exit 1, a refused
launch). Usage errors (a reserved run id, a bad --max-price) are found earlier, before any AWS
call (exit 2). Where the AWS in use cannot answer (Service Quotas, the Price List API on the local
AWS) the check says so once instead of failing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import botocore.exceptions

from training_infra import launch_rules, naming
from training_infra.cli.errors import CliError, UsageError
from training_infra.config import Refused
from training_infra.pricing import BUILT_IN_NOTE, Prices, Quote, cap_message, dollars, under_cap

# Run ids the code itself uses as a path component beside real runs: refused as --run-id.
RESERVED_RUN_IDS = {
    "latest": f"{naming.LATEST_PREFIX} holds a copy of the newest finished run (`fetch latest`)",
    "default": "the run id of the create_instance instance when the run_id setting is empty",
}
MAX_PRICE_LIMIT = launch_rules.MAX_PRICE_LIMIT
MIN_PRICE = launch_rules.MIN_PRICE
SKIPPED = "skipped: not available here"
# Service Quotas codes (vCPUs per region) by family group and market. The spot codes are the ones the EC2 User
# Guide's "Spot Instance quotas" page links to in the Service Quotas console
# (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/using-spot-limits.html): All P5 Spot Instance Requests
# L-C4BD4855 (P5 and newer: P5, P5e, P5en) and All Trn Spot Instance Requests L-6B0D517C among them. On demand, every
# P generation shares one quota. A quota counts every running or pending instance of its families in the region.
QUOTAS: dict[tuple[str, str], tuple[str, str]] = {
    ("G", "on-demand"): ("L-DB2E81BA", "Running On-Demand G and VT instances"),
    ("G", "spot"): ("L-3819A6DF", "All G and VT Spot Instance Requests"),
    ("P", "on-demand"): ("L-417A185B", "Running On-Demand P instances"),
    ("P", "spot"): ("L-7212CCBC", "All P4, P3 and P2 Spot Instance Requests"),
    ("P5+", "on-demand"): ("L-417A185B", "Running On-Demand P instances"),
    ("P5+", "spot"): ("L-C4BD4855", "All P5 Spot Instance Requests"),
    ("Inf", "on-demand"): ("L-1945791B", "Running On-Demand Inf instances"),
    ("Inf", "spot"): ("L-B5D1601B", "All Inf Spot Instance Requests"),
    ("Trn", "on-demand"): ("L-2C3B7624", "Running On-Demand Trn instances"),
    ("Trn", "spot"): ("L-6B0D517C", "All Trn Spot Instance Requests"),
    ("Standard", "on-demand"): ("L-1216C47A", "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances"),
    ("Standard", "spot"): ("L-34B43A08", "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests"),
}
_FAMILY = re.compile(r"^([a-z]+)(\d*)")


# ---- usage (no AWS call) -------------------------------------------------------------------------


def check_run_id_name(run_id: str | None) -> None:
    if run_id in RESERVED_RUN_IDS:
        raise UsageError(
            f"option '--run-id': got {run_id!r}; allowed: any run id but {', '.join(sorted(RESERVED_RUN_IDS))} "
            f"({run_id}: {RESERVED_RUN_IDS[run_id]})"
        )


def parse_max_price(value: Any) -> float | None:
    """--max-price: USD per hour, more than 0, at most 1000 (launch_rules.max_price, as the run spec file)."""
    if value is None:
        return None
    try:
        return launch_rules.max_price(value)
    except Refused as refused:
        raise UsageError(f"option '--max-price': got {value!r}; allowed: {refused.allowed}") from None


# ---- the plan and what the checks found ---------------------------------------------------------------


def markets_of(market: str) -> list[str]:
    return {"spot": ["spot"], "on-demand": ["on-demand"], "spot-then-on-demand": ["spot", "on-demand"]}[market]


@dataclass
class Plan:
    """What `launch` is about to do, decided from the options and the stack (nothing created yet)."""

    run_id: str
    image_tag: str
    instance_types: list[str]
    market: str
    subnets: list[str]
    deadline: str
    template_id: str
    run_tags: dict[str, str]
    max_price: float | None = None
    allow_empty_data: bool = False
    resume: bool = False
    nodes: int = 1  # a gang (launch --nodes): the vCPU quota must hold all of it at once


@dataclass
class Report:
    plan: Plan
    lines: list[tuple[str, str]] = field(default_factory=list)  # (check, what it found) for --dry-run
    notes: list[str] = field(default_factory=list)  # said once: skipped checks, built-in prices
    failures: list[str] = field(default_factory=list)
    zones: dict[str, str] = field(default_factory=dict)  # subnet -> zone
    offered: list[tuple[str, str]] = field(default_factory=list)  # (type, zone) EC2 offers
    prices: dict[str, dict[tuple[str, str], Quote]] = field(default_factory=dict)  # market -> pool -> price
    scores: Any = None  # capacity.Scores: the spot placement score of each zone (spot markets only)
    resumed: Any = None  # the finished run record `--resume` continues (None: a new run)

    def list_prices(self) -> dict[str, float]:
        """Type -> on-demand list price, for the run's spec (what the ledger prices on-demand attempts with)."""
        return {t: q.usd for (t, _zone), q in self.prices.get("on-demand", {}).items() if q.usd is not None}

    def highest_list_price(self) -> float | None:
        """An upper bound of the hourly price for the agent's estimate: the dearest list price, or the cap."""
        quotes = [q.usd for q in self.prices.get("on-demand", {}).values() if q.usd is not None]
        highest = max(quotes) if quotes else None
        cap = self.plan.max_price
        return min(highest, cap) if highest is not None and cap else highest or cap


# ---- the checks ----------------------------------------------------------------------------------------


def run(aws: Any, plan: Plan, *, prices: Prices, store: Any, dry_run: bool = False) -> Report:
    """Every check; raises CliError with one line per failure, else returns what it found.

    Checks that do not need each other's answers ask AWS at once (botocore clients are thread-safe;
    they are all made first, since making them is not), so the preflight waits for about four
    round trips, not a dozen. Each check fills its own part; the parts are joined in a fixed order.
    """
    ec2, s3, ecr, quotas = (aws.client(name) for name in ("ec2", "s3", "ecr", "service-quotas"))
    outputs_bucket, data_bucket, repository = (
        aws.output(key)
        for key in (naming.OUTPUT_OUTPUTS_BUCKET, naming.OUTPUT_TRAINING_BUCKET, naming.OUTPUT_ECR_REPOSITORY_URI)
    )
    with ThreadPoolExecutor(max_workers=4) as pool:

        def part(check: Callable[..., None], *args: Any, base: Report | None = None, **kwargs: Any) -> Future[Report]:
            found = Report(plan, zones=base.zones, offered=base.offered) if base else Report(plan)
            return pool.submit(lambda: (check(found, *args, **kwargs), found)[1])

        independent = [
            part(check_run_id, store, s3, outputs_bucket),
            part(check_image, ecr, repository),
            part(check_data, s3, data_bucket),
        ]
        offerings = Report(plan)
        check_offerings(offerings, ec2, aws.region_name)  # the zones and pools the checks below look at
        dependent = [
            part(check_quotas, ec2, quotas, aws.region_name, base=offerings),
            part(check_prices, prices, all_markets=dry_run, base=offerings),
        ]
        if "spot" in markets_of(plan.market):
            table = getattr(store, "table", "")
            dependent.append(part(check_placement, ec2, aws.client("dynamodb") if table else None, table,
                                  base=offerings))  # fmt: skip
        parts = [*(f.result() for f in independent), offerings, *(f.result() for f in dependent)]
    report = Report(plan, zones=offerings.zones, offered=offerings.offered)
    for found in parts:
        report.lines += found.lines
        report.notes += found.notes
        report.failures += found.failures
        report.prices.update(found.prices)
        report.scores = report.scores or found.scores
        report.resumed = report.resumed or found.resumed
    if prices.used_built_in:
        report.notes.append(f"{BUILT_IN_NOTE} ({prices.fallback_reason or 'the Price List API has no price for it'})")
    if report.failures:
        raise CliError("\n".join(report.failures))
    return report


def check_run_id(report: Report, store: Any, s3: Any, outputs_bucket: str) -> None:
    """A new id, or with --resume a finished run's id; never an active run's, never a used one by accident."""
    run_id, resume = report.plan.run_id, report.plan.resume
    record = store.get(run_id)
    if record is not None and record.active:
        report.failures.append(
            f"run {run_id} already exists: choose another --run-id (`training-infra status {run_id}` shows it)"
            if not resume
            else f"run {run_id} is still {record.state}: nothing to resume (`training-infra stop {run_id}` ends it)"
        )
        return
    used = record is not None or bool(
        s3.list_objects_v2(Bucket=outputs_bucket, Prefix=f"{naming.RUNS_PREFIX}{run_id}/", MaxKeys=1).get("KeyCount")
    )
    if used and not resume:
        how = f"ended {record.state}" if record is not None else f"has outputs in s3://{outputs_bucket}/runs/{run_id}/"
        report.failures.append(
            f"run {run_id} {how}: pass --resume to continue it from its checkpoints, or choose another --run-id"
        )
    elif resume and not used:
        report.failures.append(
            f"--resume: there is no run {run_id} to continue (`training-infra status` lists runs); "
            "leave out --resume for a new run"
        )
    elif resume:
        report.resumed = record
        attempts = len(record.attempts) if record is not None else 0
        report.lines.append(
            ("run", f"{run_id} (resumed: attempt {attempts + 1}, from s3://{outputs_bucket}/checkpoints/{run_id}/)")
        )
    else:
        report.lines.append(("run", f"{run_id} (new)"))


def check_image(report: Report, ecr: Any, repository_uri: str) -> None:
    registry, _, repository = repository_uri.partition("/")
    tag = report.plan.image_tag
    try:
        ecr.describe_images(
            registryId=registry.split(".", 1)[0], repositoryName=repository, imageIds=[{"imageTag": tag}]
        )
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code == "ImageNotFoundException":
            report.failures.append(
                f"image {repository}:{tag} is not in ECR: push it first (the image workflow pushes every commit "
                f"to main as its SHA and latest) or pass --image-tag with a pushed tag "
                f"(`aws ecr list-images --repository-name {repository}`)"
            )
            return
        if code == "RepositoryNotFoundException":
            report.failures.append(f"ECR repository {repository} does not exist: deploy the stacks (`make deploy`)")
            return
        raise
    report.lines.append(("image", f"{repository_uri}:{tag} (in ECR)"))


def check_data(report: Report, s3: Any, data_bucket: str) -> None:
    where = f"s3://{data_bucket}/{naming.DATA_PREFIX}"
    has_data = bool(s3.list_objects_v2(Bucket=data_bucket, Prefix=naming.DATA_PREFIX, MaxKeys=1).get("KeyCount"))
    if has_data:
        report.lines.append(("data", f"{where} (has objects)"))
    elif report.plan.allow_empty_data:
        report.lines.append(("data", f"{where} (empty; --allow-empty-data)"))
    else:
        report.failures.append(
            f"no training data: {where} is empty: upload it first (`training-infra upload ./data`) "
            "or pass --allow-empty-data"
        )


def check_offerings(report: Report, ec2: Any, region: str) -> None:
    plan = report.plan
    report.zones = {
        s["SubnetId"]: s["AvailabilityZone"] for s in ec2.describe_subnets(SubnetIds=plan.subnets)["Subnets"]
    }
    zones = sorted(set(report.zones.values()))
    offerings = ec2.describe_instance_type_offerings(
        LocationType="availability-zone",
        Filters=[{"Name": "instance-type", "Values": plan.instance_types}, {"Name": "location", "Values": zones}],
    )["InstanceTypeOfferings"]
    offered = {(o["InstanceType"], o["Location"]) for o in offerings}
    report.offered = [(t, z) for t in plan.instance_types for z in zones if (t, z) in offered]
    pools = len(plan.instance_types) * len(zones)
    if not report.offered:
        report.failures.append(
            f"no instance type offered where the run may go: EC2 offers none of {', '.join(plan.instance_types)} in "
            f"{', '.join(zones)} (DescribeInstanceTypeOfferings): pass --instance-types with a type offered there "
            f"(`aws ec2 describe-instance-type-offerings --location-type availability-zone --region {region}`)"
        )
        return
    report.lines.append(("pools", f"{len(report.offered)} of {pools} type x zone pairs offered by EC2"))


def family_group(instance_type: str) -> str | None:
    match = _FAMILY.match(instance_type)
    if not match:
        return None
    letters, generation = match[1], int(match[2] or 0)
    if letters in ("g", "gr", "vt"):
        return "G"
    if letters == "p":
        return "P" if generation < 5 else "P5+"
    if letters == "inf":
        return "Inf"
    if letters == "trn":
        return "Trn"
    if letters in ("dl", "hpc"):
        return None  # quotas of their own, not listed
    if letters[0] in "acdhimrtz":
        return "Standard"
    return None


def quota_of(instance_type: str, market: str) -> tuple[str, str] | None:
    """(code, name) of the vCPU quota an instance of this type in this market counts against, if known."""
    return QUOTAS.get((family_group(instance_type) or "", market))


def running_vcpus(ec2: Any, known: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(vCPUs in use per quota code, by the account's running and pending instances; their types' vCPUs).

    Spot instances count against the spot quotas, every other instance against the on-demand ones. `known` is
    type -> vCPUs already read; the rest are asked with one DescribeInstanceTypes.
    """
    kwargs: dict[str, Any] = {"Filters": [{"Name": "instance-state-name", "Values": ["pending", "running"]}]}
    instances: list[tuple[str, str]] = []
    while True:
        page = ec2.describe_instances(**kwargs)
        for reservation in page.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                market = "spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand"
                instances.append((instance.get("InstanceType", ""), market))
        if not page.get("NextToken"):
            break
        kwargs["NextToken"] = page["NextToken"]
    return _count(instances, known, ec2)


def _count(instances: list[tuple[str, str]], known: dict[str, int], ec2: Any) -> tuple[dict[str, int], dict[str, int]]:
    vcpus = dict(known)
    missing = sorted({t for t, _m in instances if t and t not in vcpus and quota_of(t, "on-demand")})
    for start in range(0, len(missing), 100):
        for found in ec2.describe_instance_types(InstanceTypes=missing[start : start + 100])["InstanceTypes"]:
            vcpus[found["InstanceType"]] = int(found.get("VCpuInfo", {}).get("DefaultVCpus", 0))
    used: dict[str, int] = {}
    for instance_type, market in instances:
        quota = quota_of(instance_type, market)
        if quota is not None:
            used[quota[0]] = used.get(quota[0], 0) + vcpus.get(instance_type, 0)
    return used, vcpus


def check_quotas(report: Report, ec2: Any, quotas: Any, region: str) -> None:
    """Each type's vCPUs plus those the account's running instances already use of its family's quota, in the
    run's market(s); fails only when no type fits any."""
    plan = report.plan
    types = sorted({t for t, _ in report.offered} or set(plan.instance_types))
    vcpus = {
        t["InstanceType"]: int(t.get("VCpuInfo", {}).get("DefaultVCpus", 0))
        for t in ec2.describe_instance_types(InstanceTypes=types)["InstanceTypes"]
    }
    try:
        used, _ = running_vcpus(ec2, vcpus)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
        report.notes.append(f"vCPUs in use: {SKIPPED} ({_reason(error)}): each type checked against the whole quota")
        used = {}
    values: dict[str, float] = {}
    fits, shortfalls, found = False, [], []
    for market in markets_of(plan.market):
        short: list[tuple[int, str, str, str, float, int]] = []
        for instance_type in types:
            quota = quota_of(instance_type, market)
            if quota is None or instance_type not in vcpus:
                fits = True  # no code to check: the fleet reports it if the quota is short
                continue
            code, name = quota
            if code not in values:
                try:
                    values[code] = float(quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"])
                except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
                    report.notes.append(f"vCPU quota: {SKIPPED} ({_reason(error)})")
                    return
            need, in_use = vcpus[instance_type] * plan.nodes, used.get(code, 0)
            if in_use + need <= values[code]:
                fits = True
                busy = f" - {in_use} in use" if in_use else ""
                found.append(f"{name} ({code}) {values[code]:g}{busy} >= {need} for {instance_type}")
            else:
                short.append((need, instance_type, code, name, values[code], in_use))
        if short:
            need, instance_type, code, name, have, in_use = min(short)
            busy = f", and running instances already use {in_use} of it" if in_use else ""
            shortfalls.append(
                f"vCPU quota too low for {market}: {instance_type}{f' x {plan.nodes} nodes' if plan.nodes > 1 else ''} "
                f"needs {need} vCPUs and '{name}' ({code}) is "
                f"{have:g} in {region}{busy}: ask for more with `aws service-quotas request-service-quota-increase "
                f"--service-code ec2 --quota-code {code} --desired-value {in_use + need} --region {region}`"
            )
    if not fits:
        report.failures.extend(shortfalls)
    else:
        report.lines.append(("quota", "; ".join(dict.fromkeys(found)) or "no quota code to check"))


def check_placement(report: Report, ec2: Any, dynamodb: Any, table: str) -> None:
    """Each zone's spot placement score for the run's types and size (one instance): shown, never a failure.

    Read from the supervisor's cache in the run table when fresh, else asked of EC2 (the same configuration the
    supervisor asks, which EC2's limit on new configurations lets anyone ask again); the CLI never writes it.
    """
    from training_infra.supervisor.runtime import capacity

    plan = report.plan
    zones = sorted(set(report.zones.values()))
    scores = capacity.PlacementScores(ec2, dynamodb, table, write=False).get(
        plan.instance_types, plan.nodes, datetime.now(UTC), plan.subnets
    )
    report.scores = scores
    if scores.missing:
        report.notes.append(f"spot placement scores: {SKIPPED} ({scores.missing})")
        return
    report.lines.append(("spot scores", capacity.describe(scores, zones)))
    if scores.caveat():
        report.notes.append(f"spot placement scores: {scores.caveat()}")
    _kept, low = capacity.preferred_pools([(t, s) for t in plan.instance_types for s in report.zones], report.zones,
                                          scores)  # fmt: skip
    if low:
        report.notes.append(
            f"spot placement scores: {', '.join(low)} score {capacity.LOW_SCORE} or less: the supervisor leaves "
            "them out of spot fleets while another zone scores higher"
        )


def _reason(error: Exception) -> str:
    if isinstance(error, botocore.exceptions.ClientError):
        return error.response.get("Error", {}).get("Code", "") or "error"
    return type(error).__name__


def check_prices(report: Report, prices: Prices, *, all_markets: bool) -> None:
    """Prices of the offered pools; with --max-price at least one pool of some market must be at or under it.

    Spot prices are asked only when there is a cap or a dry run to show them; list prices always
    (the agent's cost estimate uses the dearest).
    """
    plan = report.plan
    pools = report.offered or [(t, z) for t in plan.instance_types for z in sorted(set(report.zones.values()))]
    wanted = markets_of(plan.market)
    report.prices["on-demand"] = prices.pool_prices("on-demand", pools)
    if "spot" in wanted and (plan.max_price or all_markets):
        report.prices["spot"] = prices.pool_prices("spot", pools)
    if not plan.max_price:
        return
    cheapest_seen: list[tuple[tuple[str, str], float, str]] = []
    for market in wanted:
        fitting, cheapest = under_cap(report.prices[market], plan.max_price)
        if fitting:
            report.lines.append(("price cap", f"{dollars(plan.max_price)}/hour: {len(fitting)} {market} pool(s) fit"))
            return
        if cheapest is not None:
            cheapest_seen.append((*cheapest, market))
    best = min(cheapest_seen, key=lambda item: item[1]) if cheapest_seen else None
    report.failures.append(
        f"{cap_message(plan.max_price, best)}: raise --max-price or choose cheaper --instance-types or --market"
    )


# ---- --dry-run -----------------------------------------------------------------------------------------


def dry_run_lines(report: Report) -> list[str]:
    """What launch would do, as `launch --dry-run` prints it."""
    plan = report.plan
    width = max(len(name) for name, _ in report.lines + [("deadline", "")])
    lines = [f"preflight passed for run {plan.run_id}; --dry-run: nothing created"]
    lines += [f"  {name:<{width}}  {found}" for name, found in report.lines]
    lines.append(f"  {'deadline':<{width}}  {plan.deadline} (one deadline for every attempt)")
    if plan.max_price:
        lines.append(
            f"  {'caps':<{width}}  fleet MaxTotalPrice {plan.max_price:g}"
            + (", spot MaxPrice per pool" if "spot" in markets_of(plan.market) else "")
        )
    lines.append(f"would launch attempt 1 with one EC2 Fleet ({plan.market}) over these pools, price per hour now:")
    for instance_type, zone in report.offered:
        cells = []
        for market in markets_of(plan.market):
            quote = report.prices.get(market, {}).get((instance_type, zone))
            price = dollars(quote.usd) if quote and quote.usd is not None else "unknown"
            over = quote is not None and quote.usd is not None and bool(plan.max_price) and quote.usd > plan.max_price
            cells.append(f"{market} {price}" + (" (over the cap: not offered)" if over else ""))
        score = report.scores.of(zone) if report.scores is not None and report.scores.zones else None
        if score is not None:
            cells.append(f"zone score {score}/10")
        lines.append(f"  {instance_type:<14} {zone:<16} {', '.join(cells)}")
    lines += [f"note: {note}" for note in report.notes]
    return lines
