"""Typed, validated settings.

Settings arrive from cdk.json context and `-c key=value` (always strings on the command line).
They are parsed once, here, in plain Python: a bad value fails in milliseconds with one line that
names the setting, the value received and what is allowed, before any construct exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# Accelerated families the Deep Learning AMI supports, plus the small CPU families that are
# useful for a dry run of the whole pipeline. Anything else is almost always a typo.
GPU_FAMILIES = (
    "g4dn", "g4ad", "g5", "g5g", "g6", "g6e", "g6f", "gr6", "p3", "p3dn", "p4d", "p4de",
    "p5", "p5e", "p5en", "p6-b200", "trn1", "trn1n", "trn2", "inf2",
)  # fmt: skip
CPU_FAMILIES = ("t3", "t3a", "m5", "m6i", "m7i", "c5", "c6i", "c7i")
INSTANCE_FAMILIES = GPU_FAMILIES + CPU_FAMILIES
_INSTANCE_TYPE = re.compile(r"^(?P<family>[a-z0-9-]+)\.(?P<size>(\d+)?x?large|metal(-\d+xl)?|medium|small|micro|nano)$")

# CloudWatch Logs accepts only these retention periods (days), named as in aws_logs.RetentionDays.
LOG_RETENTION_NAMES = {
    1: "ONE_DAY", 3: "THREE_DAYS", 5: "FIVE_DAYS", 7: "ONE_WEEK", 14: "TWO_WEEKS", 30: "ONE_MONTH",
    60: "TWO_MONTHS", 90: "THREE_MONTHS", 120: "FOUR_MONTHS", 150: "FIVE_MONTHS", 180: "SIX_MONTHS",
    365: "ONE_YEAR", 400: "THIRTEEN_MONTHS", 545: "EIGHTEEN_MONTHS", 731: "TWO_YEARS", 1096: "THREE_YEARS",
    1827: "FIVE_YEARS", 2192: "SIX_YEARS", 2557: "SEVEN_YEARS", 2922: "EIGHT_YEARS", 3288: "NINE_YEARS",
    3653: "TEN_YEARS",
}  # fmt: skip
LOG_RETENTION_DAYS = tuple(LOG_RETENTION_NAMES)

_GITHUB_REPO = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$")
_GIT_BRANCH = re.compile(r"^(?!/|.*//|.*\.\.|.*@\{)[A-Za-z0-9._/-]{1,200}(?<![/.])$")
_EMAIL = re.compile(r"^[^@\s,;]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}$")
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_OIDC_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:oidc-provider/token\.actions\.githubusercontent\.com$")
_AMI_ID = re.compile(r"^ami-[0-9a-f]{8}([0-9a-f]{9})?$")
_VPC_ID = re.compile(r"^vpc-[0-9a-f]{8}([0-9a-f]{9})?$")
_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ECR_NAME = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")
_SUBNET_ID = re.compile(r"^subnet-[0-9a-f]{8}([0-9a-f]{9})?$")
_AZ = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d[a-z]$")
_SSM_PARAM = re.compile(r"^/[A-Za-z0-9_./-]+$")

DEFAULT_AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"


class ConfigError(ValueError):
    """A setting is wrong. The message is one line meant for the user as is."""


def _fail(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"setting '{name}': got {value!r}; allowed: {allowed}")


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _fail(name, value, "true or false")


def _number(name: str, value: Any, *, integer: bool, lo: float, hi: float, lo_open: bool = False) -> float:
    kind = "a whole number" if integer else "a number"
    bounds = f"{'greater than' if lo_open else 'from'} {lo:g} {'up ' if lo_open else ''}to {hi:g}"
    if isinstance(value, bool):
        raise _fail(name, value, f"{kind} {bounds}")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise _fail(name, value, f"{kind} {bounds}") from None
    if not math.isfinite(number) or (integer and not number.is_integer()):
        raise _fail(name, value, f"{kind} {bounds}")
    if number < lo or number > hi or (lo_open and number == lo):
        raise _fail(name, value, f"{kind} {bounds}")
    return int(number) if integer else number


def _text(name: str, value: Any, pattern: re.Pattern[str] | None, allowed: str, *, optional: bool) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise _fail(name, value, allowed)
    value = value.strip()
    if value == "" and optional:
        return ""
    if pattern is not None and not pattern.match(value):
        raise _fail(name, value, allowed)
    return value


def _instance_type(name: str, value: Any) -> str:
    text = _text(name, value, _INSTANCE_TYPE, "an EC2 instance type such as g5.xlarge", optional=False)
    family = _INSTANCE_TYPE.match(text)["family"]  # type: ignore[index]
    if family not in INSTANCE_FAMILIES:
        raise _fail(name, value, "a type in one of the families " + ", ".join(INSTANCE_FAMILIES))
    return text


def _id_list(name: str, value: Any, pattern: re.Pattern[str], allowed: str) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    elif isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    else:
        raise _fail(name, value, allowed)
    if not all(pattern.match(item) for item in items):
        raise _fail(name, value, allowed)
    return tuple(items)


def _price(name: str, value: Any) -> str:
    if value in (None, ""):
        return ""
    return f"{_number(name, value, integer=False, lo=0, hi=1000, lo_open=True):g}"


@dataclass(frozen=True)
class Settings:
    """Every knob of the app, with the secure, cheap default in one place."""

    # The seed's training.tfvars names.
    instance_type: str = "g5.xlarge"
    use_spot: bool = True
    auto_shutdown: bool = True
    max_runtime_hours: float = 12
    create_instance: bool = False
    # GitHub and alerts.
    github_repo: str = ""
    github_branch: str = "main"
    existing_oidc_provider_arn: str = ""
    alert_email: str = ""
    monthly_budget_usd: float = 100
    # Guard rails.
    idle_minutes: int = 30
    idle_gpu_percent: float = 5
    # The instance.
    volume_size_gb: int = 150
    image_tag: str = "latest"
    training_command: str = ""
    image_id: str = ""
    ami_parameter: str = DEFAULT_AMI_PARAMETER
    spot_max_price: str = ""
    run_id: str = ""
    # Network.
    vpc_id: str = ""
    subnet_ids: tuple[str, ...] = ()
    private_networking: bool = False
    availability_zones: tuple[str, ...] = ()
    # Storage and registry.
    ecr_repository_name: str = "training-infra"
    checkpoint_retention_days: int = 30
    noncurrent_version_days: int = 30
    log_retention_days: int = 30
    checkpoint_sync_seconds: int = 300
    # Removal policy of the buckets; RETAIN keeps data when a stack is deleted.
    retain_data: bool = True
    # Reserve Lambda concurrency for the reaper (1: never two runs at once) and the notifier; new
    # accounts whose concurrency quota is still 10 cannot reserve any and must set this false.
    reserve_lambda_concurrency: bool = True
    # Opt-in: a trainer role scoped to data/ and the run's own prefixes, for trainers that read S3
    # themselves (streaming datasets). Off: the container holds no AWS credentials at all.
    trainer_s3_access: bool = False

    @property
    def github_enabled(self) -> bool:
        return bool(self.github_repo)

    @property
    def instance_family(self) -> str:
        return self.instance_type.split(".", 1)[0]

    def to_context(self) -> dict[str, Any]:
        """The settings as cdk.json context values (what `-c` would set)."""
        out = dataclasses.asdict(self)
        out["availability_zones"] = ",".join(self.availability_zones)
        out["subnet_ids"] = ",".join(self.subnet_ids)
        return out


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "instance_type": _instance_type,
    "use_spot": _parse_bool,
    "auto_shutdown": _parse_bool,
    "max_runtime_hours": lambda n, v: _number(n, v, integer=False, lo=0, hi=168, lo_open=True),
    "create_instance": _parse_bool,
    "github_repo": lambda n, v: _text(n, v, _GITHUB_REPO, "empty (no GitHub roles) or owner/name, e.g. acme/trainer", optional=True),
    "github_branch": lambda n, v: _text(n, v, _GIT_BRANCH, "a git branch name such as main", optional=False),
    "existing_oidc_provider_arn": lambda n, v: _text(
        n, v, _OIDC_ARN, "empty or arn:aws:iam::<account>:oidc-provider/token.actions.githubusercontent.com", optional=True
    ),
    "alert_email": lambda n, v: _text(n, v, _EMAIL, "empty or one e-mail address such as ml-team@example.com", optional=True),
    "monthly_budget_usd": lambda n, v: _number(n, v, integer=False, lo=1, hi=1_000_000),
    "idle_minutes": lambda n, v: _number(n, v, integer=True, lo=5, hi=1440),
    "idle_gpu_percent": lambda n, v: _number(n, v, integer=False, lo=0, hi=100),
    "volume_size_gb": lambda n, v: _number(n, v, integer=True, lo=100, hi=16384),
    "image_tag": lambda n, v: _text(n, v, _IMAGE_TAG, "an image tag of letters, digits, '_', '.', '-' (at most 128)", optional=False),
    "training_command": lambda n, v: _text(n, v, None, "a command line (empty runs the image's CMD)", optional=True),
    "image_id": lambda n, v: _text(n, v, _AMI_ID, "empty (Deep Learning AMI from SSM) or an AMI id such as ami-0123456789abcdef0", optional=True),
    "ami_parameter": lambda n, v: _text(n, v, _SSM_PARAM, "an SSM parameter path that holds an AMI id", optional=False),
    "spot_max_price": _price,
    "run_id": lambda n, v: _text(n, v, _RUN_ID, "empty or lowercase letters, digits and '-' (at most 63), e.g. bert-lr3e4", optional=True),
    "vpc_id": lambda n, v: _text(n, v, _VPC_ID, "empty (a new VPC) or a VPC id such as vpc-0123456789abcdef0", optional=True),
    "subnet_ids": lambda n, v: _id_list(n, v, _SUBNET_ID, "a comma-separated list of subnet ids such as subnet-0123456789abcdef0"),
    "private_networking": _parse_bool,
    "availability_zones": lambda n, v: _id_list(n, v, _AZ, "a comma-separated list of availability zones such as us-east-1a,us-east-1b"),
    "ecr_repository_name": lambda n, v: _text(n, v, _ECR_NAME, "a lowercase ECR repository name such as training-infra", optional=False),
    "checkpoint_retention_days": lambda n, v: _number(n, v, integer=True, lo=1, hi=3650),
    "noncurrent_version_days": lambda n, v: _number(n, v, integer=True, lo=1, hi=3650),
    "log_retention_days": lambda n, v: _log_retention(n, v),
    "checkpoint_sync_seconds": lambda n, v: _number(n, v, integer=True, lo=30, hi=86400),
    "retain_data": _parse_bool,
    "reserve_lambda_concurrency": _parse_bool,
    "trainer_s3_access": _parse_bool,
}


def _log_retention(name: str, value: Any) -> int:
    days = _number(name, value, integer=True, lo=1, hi=3653)
    if days not in LOG_RETENTION_DAYS:
        raise _fail(name, value, "one of " + ", ".join(map(str, LOG_RETENTION_DAYS)))
    return int(days)


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(Settings))
assert set(SETTING_NAMES) == set(_PARSERS), "every setting needs a parser"


def parse_settings(context: Mapping[str, Any]) -> Settings:
    """Parse raw context into Settings; keys that are not settings are ignored unless they look like a typo."""
    for key in context:
        if key in _PARSERS or key.startswith(("@", "aws:", "cdk", "acknowledged-issue")):
            continue
        close = difflib.get_close_matches(key, SETTING_NAMES, n=1, cutoff=0.75)
        if close:
            raise ConfigError(f"unknown setting '{key}': did you mean '{close[0]}'? (settings: see README 'Settings')")
    values = {name: parse(name, context[name]) for name, parse in _PARSERS.items() if name in context}
    settings = Settings(**values)
    _check_combinations(settings)
    return settings


def _check_combinations(s: Settings) -> None:
    if s.existing_oidc_provider_arn and not s.github_repo:
        raise _fail("github_repo", s.github_repo, "owner/name when existing_oidc_provider_arn is set (the provider is only used by the GitHub roles)")
    if s.spot_max_price and not s.use_spot:
        raise _fail("spot_max_price", s.spot_max_price, "empty when use_spot is false")
    if s.private_networking and s.vpc_id:
        raise _fail("private_networking", s.private_networking, "false when vpc_id is set (an existing VPC brings its own endpoints)")
    if bool(s.vpc_id) != bool(s.subnet_ids):
        raise _fail("subnet_ids", ",".join(s.subnet_ids), "one or more subnet ids of vpc_id when vpc_id is set, and empty otherwise")
    if s.availability_zones and s.vpc_id:
        raise _fail("availability_zones", ",".join(s.availability_zones), "empty when vpc_id is set")
