"""Max-runtime reaper: the cloud-side backstop for a hung or forgotten training instance.

Runs every few minutes. It finds instances tagged as managed by training-infra AND launched with
the project's instance profile (a tag anyone with ec2:CreateTags can add; the profile only someone
allowed to pass the instance role), and terminates every one that is past its deadline: the
`deadline` tag (ISO 8601 UTC) when it is readable, otherwise launch time plus the
`max-runtime-hours` tag or the stack's default; never later than launch + 168 h. Each instance is
handled on its own: one that fails is recorded, the sweep goes on, and the run then fails so the
Errors alarm fires. Each termination gets a metric (the max-runtime alarm) and a readable notice.

Stdlib and boto3 only: the runtime folder is the whole Lambda package (one asset for both functions).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import boto3
from botocore.exceptions import ClientError

log = logging.getLogger()
log.setLevel(logging.INFO)

# Defaults mirror training_infra.naming; the construct passes the real values as environment.
DEFAULT_MANAGED_TAG = "training-infra:managed"
DEFAULT_RUN_ID_TAG = "training-infra:run-id"
DEFAULT_DEADLINE_TAG = "training-infra:deadline"
DEFAULT_MAX_RUNTIME_TAG = "training-infra:max-runtime-hours"
DEFAULT_NAMESPACE = "TrainingInfra"
METRIC_NAME = "InstancesTerminatedForMaxRuntime"

# Instances in these states still cost money (stopped ones keep their volumes).
LIVE_STATES = ("pending", "running", "stopping", "stopped")
# DescribeInstances page size; small values only matter in tests.
PAGE_SIZE = 500
# No run is longer than this, whatever its tags say (training_infra.naming.MAX_RUNTIME_HOURS_LIMIT).
RUNTIME_LIMIT_HOURS = 168


class ReaperError(RuntimeError):
    """An expired instance was not terminated or not reported; raised so the Errors alarm fires."""


@dataclass(frozen=True)
class ReaperConfig:
    topic_arn: str
    max_runtime_hours: float
    # Only instances whose instance profile ARN starts with this are the project's (its path).
    instance_profile_arn_prefix: str
    grace_minutes: float = 0
    managed_tag: str = DEFAULT_MANAGED_TAG
    run_id_tag: str = DEFAULT_RUN_ID_TAG
    deadline_tag: str = DEFAULT_DEADLINE_TAG
    max_runtime_tag: str = DEFAULT_MAX_RUNTIME_TAG
    namespace: str = DEFAULT_NAMESPACE

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ReaperConfig:
        return cls(
            topic_arn=env["TOPIC_ARN"],
            max_runtime_hours=float(env["MAX_RUNTIME_HOURS"]),
            instance_profile_arn_prefix=env["INSTANCE_PROFILE_ARN_PREFIX"],
            grace_minutes=float(env.get("GRACE_MINUTES", "0")),
            managed_tag=env.get("MANAGED_TAG", DEFAULT_MANAGED_TAG),
            run_id_tag=env.get("RUN_ID_TAG", DEFAULT_RUN_ID_TAG),
            deadline_tag=env.get("DEADLINE_TAG", DEFAULT_DEADLINE_TAG),
            max_runtime_tag=env.get("MAX_RUNTIME_TAG", DEFAULT_MAX_RUNTIME_TAG),
            namespace=env.get("METRIC_NAMESPACE", DEFAULT_NAMESPACE),
        )


@dataclass
class Verdict:
    """Why an instance's deadline is what it is, so the notice can say it in plain words."""

    deadline: datetime
    reason: str
    unreadable_tag: str | None = None


@dataclass
class ReapResult:
    checked: list[str] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    notices_failed: dict[str, str] = field(default_factory=dict)
    unreadable_tags: dict[str, str] = field(default_factory=dict)
    # Tagged managed, but not launched with the project's instance profile: never touched.
    ignored: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "checked": len(self.checked),
            "ignored": self.ignored,
            "terminated": self.terminated,
            "failed": self.failed,
            "notices_failed": self.notices_failed,
            "unreadable_tags": self.unreadable_tags,
        }


def parse_deadline(text: str) -> datetime | None:
    """An ISO 8601 time with an explicit zone (`2026-11-28T18:00:00Z`), or None if unreadable.

    A time without a zone is refused: guessing the zone could end a run hours early.
    """
    try:
        value = datetime.fromisoformat(text.strip())
        # Times at the calendar's edges overflow when moved to UTC or when a grace is added.
        return value.astimezone(UTC) if value.tzinfo is not None else None
    except (ValueError, OverflowError, TypeError, AttributeError):
        return None


def _positive_hours(text: str) -> float | None:
    """Hours in (0, 168], or None: a tag cannot make a run longer than any run may be."""
    try:
        hours = float(text)
    except (ValueError, OverflowError, TypeError):
        return None
    return hours if 0 < hours <= RUNTIME_LIMIT_HOURS else None


def decide_deadline(tags: dict[str, str], launch_time: datetime, config: ReaperConfig) -> Verdict:
    """The instance's deadline: its deadline tag, else launch time plus its own or the default max runtime.

    Never later than launch + 168 h: a deadline tag is a plain tag that anyone who may tag the
    instance can move, and no run may outlive the longest runtime the settings allow.
    """
    limit = launch_time + timedelta(hours=RUNTIME_LIMIT_HOURS)
    verdict = _tagged_deadline(tags, launch_time, config)
    if verdict.deadline > limit:
        return Verdict(limit, f"{RUNTIME_LIMIT_HOURS} h after launch (the longest run allowed)", verdict.unreadable_tag)
    return verdict


def _tagged_deadline(tags: dict[str, str], launch_time: datetime, config: ReaperConfig) -> Verdict:
    unreadable = None
    raw_deadline = tags.get(config.deadline_tag)
    if raw_deadline is not None:
        deadline = parse_deadline(raw_deadline)
        if deadline is not None:
            return Verdict(deadline, f"its deadline tag {config.deadline_tag}={raw_deadline}")
        unreadable = f"{config.deadline_tag}={raw_deadline!r}"
    raw_hours = tags.get(config.max_runtime_tag)
    hours = _positive_hours(raw_hours) if raw_hours is not None else None
    if raw_hours is not None and hours is None:
        unreadable = ", ".join(filter(None, [unreadable, f"{config.max_runtime_tag}={raw_hours!r}"]))
    source = f"its {config.max_runtime_tag} tag" if hours is not None else "the stack's max_runtime_hours"
    hours = hours if hours is not None else config.max_runtime_hours
    return Verdict(launch_time + timedelta(hours=hours), f"{hours:g} h after launch ({source})", unreadable)


def _code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", str(error))


def _managed_instances(ec2, config: ReaperConfig):
    paginator = ec2.get_paginator("describe_instances")
    filters = [
        {"Name": f"tag:{config.managed_tag}", "Values": ["true"]},
        {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
    ]
    for page in paginator.paginate(Filters=filters, PaginationConfig={"PageSize": PAGE_SIZE}):
        for reservation in page["Reservations"]:
            yield from reservation["Instances"]


def _notice(
    instance: dict, tags: dict[str, str], verdict: Verdict, now: datetime, config: ReaperConfig
) -> tuple[str, str]:
    instance_id = instance["InstanceId"]
    run_id = tags.get(config.run_id_tag, "unknown")
    launched = instance["LaunchTime"].astimezone(UTC)
    ran_hours = (now - launched).total_seconds() / 3600
    market = instance.get("InstanceLifecycle", "on-demand")
    subject = f"training-infra: terminated {instance_id} (run {run_id}) at max runtime"[:100]
    lines = [
        f"The training-infra reaper terminated instance {instance_id} (run {run_id}).",
        f"Why: it passed its deadline {verdict.deadline:%Y-%m-%dT%H:%M:%SZ}, {verdict.reason}.",
        f"It was {instance['State']['Name']} for {ran_hours:.1f} h since launch at {launched:%Y-%m-%dT%H:%M:%SZ}"
        f" ({instance.get('InstanceType', '?')}, {market}).",
    ]
    if verdict.unreadable_tag:
        lines.append(f"Note: unreadable tag {verdict.unreadable_tag}; expected e.g. 2026-11-28T18:00:00Z.")
    lines.append("Outputs and logs uploaded before the end are in the outputs bucket under runs/<run-id>/.")
    return subject, "\n".join(lines)


def _launched_by_the_project(instance: dict, config: ReaperConfig) -> bool:
    """The instance profile is set at launch (or by someone allowed to pass the instance role), not by a tag."""
    profile_arn = (instance.get("IamInstanceProfile") or {}).get("Arn", "")
    return profile_arn.startswith(config.instance_profile_arn_prefix)


def reap(ec2, sns, cloudwatch, config: ReaperConfig, now: datetime) -> ReapResult:
    """Terminate every managed instance past its deadline (plus grace); report each one.

    Each instance is handled in isolation: whatever goes wrong with one is recorded in `failed`
    and the sweep goes on with the next.
    """
    result = ReapResult()
    # Read every page before terminating: terminations change the filtered list under the page token.
    for instance in list(_managed_instances(ec2, config)):
        instance_id = instance.get("InstanceId", "?")
        if not _launched_by_the_project(instance, config):
            result.ignored.append(instance_id)
            log.warning(
                "instance %s carries %s but not the project's instance profile: left alone",
                instance_id,
                config.managed_tag,
            )
            continue
        result.checked.append(instance_id)
        try:
            _reap_one(ec2, sns, config, now, instance, result)
        except ClientError as error:
            result.failed[instance_id] = _code(error)
            log.error("could not reap %s: %s", instance_id, error)
        except Exception as error:  # noqa: BLE001 - one instance's surprise must not shield the others
            result.failed[instance_id] = f"{type(error).__name__}: {error}"
            log.exception("could not reap %s", instance_id)
    if result.terminated:
        cloudwatch.put_metric_data(
            Namespace=config.namespace,
            MetricData=[
                {"MetricName": METRIC_NAME, "Value": len(result.terminated), "Unit": "Count", "Timestamp": now}
            ],
        )
    return result


def _reap_one(ec2, sns, config: ReaperConfig, now: datetime, instance: dict, result: ReapResult) -> None:
    instance_id = instance["InstanceId"]
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    verdict = decide_deadline(tags, instance["LaunchTime"], config)
    if verdict.unreadable_tag:
        result.unreadable_tags[instance_id] = verdict.unreadable_tag
        log.warning(
            "instance %s has an unreadable tag %s; using %s", instance_id, verdict.unreadable_tag, verdict.reason
        )
    if now < verdict.deadline + timedelta(minutes=config.grace_minutes):
        return
    ec2.terminate_instances(InstanceIds=[instance_id])
    result.terminated.append(instance_id)
    subject, message = _notice(instance, tags, verdict, now, config)
    log.info("%s", message.replace("\n", " "))
    try:
        sns.publish(TopicArn=config.topic_arn, Subject=subject, Message=message)
    except ClientError as error:
        result.notices_failed[instance_id] = _code(error)
        log.error("terminated %s but could not publish the notice: %s", instance_id, error)


def handler(event, context):
    """Lambda entry point (EventBridge schedule)."""
    config = ReaperConfig.from_env(os.environ)
    result = reap(boto3.client("ec2"), boto3.client("sns"), boto3.client("cloudwatch"), config, datetime.now(UTC))
    summary = result.as_dict()
    log.info("reaper summary %s", json.dumps(summary))
    if result.failed or result.notices_failed:
        raise ReaperError(f"reaper could not finish its work: {json.dumps(summary)}")
    return summary
