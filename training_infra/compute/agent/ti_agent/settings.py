"""The agent's settings: one declaration for the user-data renderer and for the agent's parser.

`AgentConfig` is what `training_infra/compute/user_data.py` renders into user data (each field as
`TI_<FIELD>`, values may be CloudFormation tokens there) and what the agent parses back from its
environment here, field by field, with the field's own type: a field added to one is in the other.
`Knobs` are the agent's environment-only settings (user data never sets them). Standard library
only: this module runs on the box.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ISO_TIME = re.compile(r"^[0-9]{4}-[0-9-]{5}T[0-9:.]+(Z|[+-][0-9:]+)$")
SECRET_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=(ssm:/|arn:aws[a-z-]*:secretsmanager:).")
ENV_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class SettingError(ValueError):
    """One line: which setting, what value, what is allowed."""


class Runtime(StrEnum):
    DOCKER = "docker"
    PROCESS = "process"


@dataclass(frozen=True)
class AgentConfig:
    """What the agent needs to know; each field becomes `TI_<FIELD>` in its environment."""

    data_bucket: str
    outputs_bucket: str
    image_uri: str  # repository URI without tag; the tag is `image_tag`
    image_tag: str = "latest"
    training_command: str = ""
    run_id: str = ""  # empty: the agent derives one from the date and the instance id
    region: str = ""
    log_group: str = ""
    alerts_topic_arn: str = ""
    metric_namespace: str = "TrainingInfra"
    max_runtime_seconds: int = 12 * 3600
    # The run's one absolute deadline (ISO 8601 UTC), shared by every attempt; empty: the
    # `training-infra:deadline` tag if the instance has one, else max_runtime_seconds from boot.
    deadline_at: str = ""
    auto_shutdown: bool = True
    idle_seconds: int = 30 * 60
    idle_gpu_percent: float = 5
    # No progress in HEARTBEAT_FILE for this long (after the first beat) ends the attempt `stalled`; 0: off.
    stall_seconds: int = 20 * 60
    checkpoint_sync_seconds: int = 300
    # IMDS poll for the spot notice and the stop tag: a local HTTP call, so each second is cheap.
    spot_poll_seconds: int = 1
    stop_grace_seconds: int = 60
    market: str = "spot"  # spot | on-demand
    hourly_price_usd: float = 0.0  # on-demand list price, for the cost estimate
    extra_env: str = ""  # newline-separated KEY=VALUE passed to the trainer
    stop_on_rebalance: bool = True  # false: a rebalance notice only syncs checkpoints early
    trainer_role_arn: str = ""  # empty: the container gets no AWS credentials, only the region
    secrets_reader_role_arn: str = ""  # assumed with a session policy naming only the run's TI_SECRETS
    # sync: `aws s3 sync` of data/ to /data; mount: Mountpoint for Amazon S3, read-only (data larger than the disk).
    data_access: str = "sync"


@dataclass(frozen=True)
class Knobs:
    """Environment only (`TI_<FIELD>`), so they can be given from outside; never rendered."""

    root: str = ""
    runtime: str = "docker"
    poweroff_cmd: str = "shutdown -h now"
    shutdown_bin: str = "shutdown"
    nvidia_smi: str = "nvidia-smi"
    docker: str = "docker"
    mount_s3: str = "mount-s3"  # Mountpoint for Amazon S3 (data_access=mount)
    heartbeat_file: str = "/run/training-infra/progress/heartbeat.json"
    retry_attempts: int = 4
    retry_base_seconds: int = 5
    log_ship_seconds: int = 10
    finalize_timeout_seconds: int = 900
    pull_timeout_seconds: int = 1800
    credentials_refresh_seconds: int = 1800
    trainer_session_seconds: int = 3600
    progress_metric_seconds: int = 60
    secrets: str = ""  # per run only: `training-infra launch` adds it before the overrides marker
    # Multi-node runs (ti_agent/gang.py): how long to wait for the supervisor's node/rendezvous tags, and
    # whether NCCL's init log must show EFA on a box that has EFA devices.
    rendezvous_wait_seconds: int = 600
    nccl_efa_check: bool = True
    # The stack's gang_replace_timeout_minutes in seconds, rendered per gang run by the supervisor: the survivors'
    # rendezvous waits that long for a replacement, plus its boot and image pull (gang.join_timeout_seconds).
    gang_replace_seconds: int = 600


@dataclass(frozen=True)
class Settings:
    config: AgentConfig
    knobs: Knobs
    extra_env: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)

    @property
    def runtime(self) -> Runtime:
        return Runtime(self.knobs.runtime)


# Whole numbers that must be at least 1 (a 0 would spin or never act).
AT_LEAST_ONE = {
    "max_runtime_seconds",
    "spot_poll_seconds",
    "checkpoint_sync_seconds",
    "log_ship_seconds",
    "retry_attempts",
    "pull_timeout_seconds",
    "rendezvous_wait_seconds",
    "gang_replace_seconds",
}
CHOICES = {
    "auto_shutdown": ("true", "false"),
    "stop_on_rebalance": ("true", "false"),
    "market": ("spot", "on-demand"),
    "runtime": ("docker", "process"),
    "nccl_efa_check": ("true", "false"),
    "data_access": ("sync", "mount"),
}


def _convert(name: str, kind: object, raw: str) -> object:
    env = f"TI_{name.upper()}"
    if name in CHOICES and raw not in CHOICES[name]:
        raise SettingError(f"{env}='{raw}' is not allowed: use one of {' '.join(CHOICES[name])}")
    if kind in (bool, "bool"):
        return raw == "true"
    if kind in (int, "int"):
        if not re.fullmatch(r"[0-9]+", raw):
            raise SettingError(f"{env}='{raw}' is not allowed: use a whole number (seconds or a count)")
        value = int(raw)
        if name in AT_LEAST_ONE and value == 0:
            raise SettingError(f"{env}=0 is not allowed: use at least 1")
        return value
    if kind in (float, "float"):
        if not re.fullmatch(r"[0-9]+([.][0-9]+)?", raw):
            raise SettingError(f"{env}='{raw}' is not allowed: use a number such as 5 or 0.5")
        return float(raw)
    return raw


def _parse(cls: type, environ: Mapping[str, str], defaults: Mapping[str, object]) -> object:
    values = {}
    for item in dataclasses.fields(cls):
        raw = environ.get(f"TI_{item.name.upper()}")
        if not raw:  # unset or empty: the default, as bash's ${TI_X:=default} did
            default = defaults.get(item.name, item.default)
            raw = "" if default is dataclasses.MISSING else _render(default)
        values[item.name] = _convert(item.name, item.type, raw)
    return cls(**values)


def _render(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _lenient(cls: type, environ: Mapping[str, str]) -> object:
    values = {}
    for item in dataclasses.fields(cls):
        default = "" if item.default is dataclasses.MISSING else item.default
        try:
            values[item.name] = _convert(
                item.name, item.type, environ.get(f"TI_{item.name.upper()}") or _render(default)
            )
        except SettingError:
            values[item.name] = default
    return cls(**values)


def lenient(environ: Mapping[str, str]) -> Settings:
    """Never raises: each field that parses, its default for the rest. What finalize goes by when `parse`
    refused the environment, so the power-off command, the retries and the bucket given still hold."""
    return Settings(config=_lenient(AgentConfig, environ), knobs=_lenient(Knobs, environ))


def parse(environ: Mapping[str, str]) -> Settings:
    """The TI_* environment as typed settings, or SettingError naming the first bad one."""
    config = _parse(AgentConfig, environ, {})
    knobs = _parse(Knobs, environ, {})
    assert isinstance(config, AgentConfig) and isinstance(knobs, Knobs)
    if not (config.data_bucket and config.outputs_bucket and config.image_uri):
        raise SettingError("TI_DATA_BUCKET, TI_OUTPUTS_BUCKET and TI_IMAGE_URI must all be set")
    if knobs.runtime == "process" and not config.training_command:
        raise SettingError("TI_TRAINING_COMMAND is empty: the process runtime has no image CMD to fall back on")
    if config.run_id and not RUN_ID.match(config.run_id):
        raise SettingError(f"TI_RUN_ID='{config.run_id}' is not allowed: use letters, digits, '.', '_' and '-'")
    # References only: a literal value here would be logged by the AWS error that names it.
    secrets = [line for line in knobs.secrets.splitlines() if line]
    for line in secrets:
        if not SECRET_LINE.match(line):
            raise SettingError(
                f"TI_SECRETS line '{line}' is not allowed: use NAME=ssm:/PATH or NAME=arn:aws:secretsmanager:..."
            )
    if secrets and not config.secrets_reader_role_arn:
        raise SettingError("TI_SECRETS is set but TI_SECRETS_READER_ROLE_ARN is empty: nothing may read them")
    if "halt" in knobs.poweroff_cmd:
        raise SettingError(f"TI_POWEROFF_CMD='{knobs.poweroff_cmd}' is not allowed: halt leaves the instance billing")
    extra = [line for line in config.extra_env.splitlines() if line]
    for line in extra:
        if not ENV_LINE.match(line):
            raise SettingError(f"TI_EXTRA_ENV line '{line}' is not allowed: use KEY=VALUE")
    return Settings(config=config, knobs=knobs, extra_env=extra, secrets=secrets)
