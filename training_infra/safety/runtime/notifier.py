"""Instance state notices: one short line on the alert topic when a managed instance changes state.

EventBridge state-change events carry no tags, so a rule alone cannot tell a training instance
from any other instance in the account; this function looks at the tags and stays silent for
instances training-infra does not manage.

Stdlib and boto3 only: the runtime folder is the whole Lambda package (one asset for both functions).
"""

from __future__ import annotations

import logging
import os

import boto3
from botocore.exceptions import ClientError

log = logging.getLogger()
log.setLevel(logging.INFO)

DEFAULT_MANAGED_TAG = "training-infra:managed"
DEFAULT_RUN_ID_TAG = "training-infra:run-id"

# What each state means for the person who launched the run.
MEANING = {
    "pending": "is starting",
    "running": "is running (training starts after setup)",
    "stopping": "is stopping",
    "stopped": "has stopped (its volume still costs money until it is terminated)",
    "shutting-down": "is shutting down",
    "terminated": "has terminated",
}


def describe_managed(ec2, instance_id: str, managed_tag: str) -> dict | None:
    """The instance if it carries the managed tag, else None (also None when EC2 no longer knows it)."""
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
            return None
        raise
    for reservation in reservations:
        for instance in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            if tags.get(managed_tag) == "true":
                return instance
    return None


def notice(instance: dict, state: str, run_id_tag: str) -> tuple[str, str]:
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    run_id = tags.get(run_id_tag, "unknown")
    instance_id = instance["InstanceId"]
    market = instance.get("InstanceLifecycle", "on-demand")
    subject = f"training-infra: run {run_id} instance {instance_id} {state}"[:100]
    message = (
        f"Run {run_id}: instance {instance_id} ({instance.get('InstanceType', '?')}, {market}) "
        f"{MEANING.get(state, 'is now ' + state)}."
    )
    return subject, message


def handle(event: dict, ec2, sns, topic_arn: str, managed_tag: str, run_id_tag: str) -> dict:
    detail = event.get("detail") or {}
    instance_id, state = detail.get("instance-id"), detail.get("state")
    if not instance_id or not state:
        log.warning("ignoring an event without instance-id/state: %s", event.get("detail-type"))
        return {"notified": False, "reason": "not a state-change event"}
    instance = describe_managed(ec2, instance_id, managed_tag)
    if instance is None:
        return {"notified": False, "reason": f"{instance_id} is not managed by training-infra"}
    subject, message = notice(instance, state, run_id_tag)
    sns.publish(TopicArn=topic_arn, Subject=subject, Message=message)
    log.info("%s", message)
    return {"notified": True, "instance_id": instance_id, "state": state}


def handler(event, context):
    """Lambda entry point (EventBridge rule on EC2 Instance State-change Notification)."""
    return handle(
        event,
        boto3.client("ec2"),
        boto3.client("sns"),
        os.environ["TOPIC_ARN"],
        os.environ.get("MANAGED_TAG", DEFAULT_MANAGED_TAG),
        os.environ.get("RUN_ID_TAG", DEFAULT_RUN_ID_TAG),
    )
