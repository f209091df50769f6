"""The state-change notifier against moto's EC2, SNS and SQS (`mock_aws`, in process)."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from training_infra import naming
from training_infra.safety.runtime import notifier

REGION = "us-east-1"
MOTO_AMI = "ami-12c6146b"


@pytest.fixture
def aws(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        sns = boto3.client("sns", region_name=REGION)
        sqs = boto3.client("sqs", region_name=REGION)
        topic_arn = sns.create_topic(Name="alerts")["TopicArn"]
        queue_url = sqs.create_queue(QueueName="inbox")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
        monkeypatch.setenv("TOPIC_ARN", topic_arn)

        def launch(tags: dict[str, str]) -> str:
            spec = (
                [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
                if tags
                else []
            )
            return ec2.run_instances(
                ImageId=MOTO_AMI, InstanceType="g5.xlarge", MinCount=1, MaxCount=1, TagSpecifications=spec
            )["Instances"][0]["InstanceId"]

        def notices() -> list[dict]:
            messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
            return [json.loads(m["Body"]) for m in messages]

        yield launch, notices


def state_change(instance_id: str, state: str) -> dict:
    """The shape EventBridge delivers for an EC2 Instance State-change Notification."""
    return {
        "version": "0",
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "region": REGION,
        "resources": [f"arn:aws:ec2:{REGION}:123456789012:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "state": state},
    }


def test_managed_instance_state_change_becomes_a_readable_notice(aws):
    launch, notices = aws
    instance_id = launch({naming.TAG_MANAGED: "true", naming.TAG_RUN_ID: "bert-lr3e4"})

    result = notifier.handler(state_change(instance_id, "stopped"), None)

    assert result["notified"] is True
    [notice] = notices()
    assert notice["Subject"] == f"training-infra: run bert-lr3e4 instance {instance_id} stopped"
    assert notice["Message"].startswith(f"Run bert-lr3e4: instance {instance_id} (g5.xlarge, on-demand) has stopped")


def test_unmanaged_instance_state_change_stays_silent(aws):
    launch, notices = aws
    other = launch({"team": "search"})
    not_true = launch({naming.TAG_MANAGED: "false"})

    for instance_id in (other, not_true):
        assert notifier.handler(state_change(instance_id, "running"), None)["notified"] is False
    assert notices() == []


def test_instance_unknown_to_ec2_is_ignored_without_failing(aws):
    _, notices = aws

    result = notifier.handler(state_change("i-0123456789abcdef0", "terminated"), None)

    assert result["notified"] is False
    assert notices() == []


def test_event_without_instance_details_is_ignored(aws):
    _, notices = aws

    assert notifier.handler({"detail-type": "Scheduled Event", "detail": {}}, None)["notified"] is False
    assert notices() == []
