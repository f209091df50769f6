"""One in-process moto account for the handler tests: EC2, SNS with a queue subscribed, CloudWatch."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

REGION = "us-east-1"
MOTO_AMI = "ami-12c6146b"  # one of moto's built-in images (listing them takes seconds)
ACCOUNT = "123456789012"  # moto's default account
# What the compute stack's instance profile ARN starts with (its path is the project's).
PROFILE_ARN_PREFIX = f"arn:aws:iam::{ACCOUNT}:instance-profile/training-infra/"


class Aws:
    """Clients on a fresh moto account, an `alerts` topic and an `inbox` queue subscribed to it."""

    def __init__(self) -> None:
        self.ec2 = boto3.client("ec2", region_name=REGION)
        self.sns = boto3.client("sns", region_name=REGION)
        self.sqs = boto3.client("sqs", region_name=REGION)
        self.cloudwatch = boto3.client("cloudwatch", region_name=REGION)
        self.topic_arn = self.sns.create_topic(Name="alerts")["TopicArn"]
        self.queue_url = self.sqs.create_queue(QueueName="inbox")["QueueUrl"]
        queue_arn = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        self.sns.subscribe(TopicArn=self.topic_arn, Protocol="sqs", Endpoint=queue_arn)
        iam = boto3.client("iam", region_name=REGION)
        # The project's instance profile (path /training-infra/, as the compute stack makes it) and another one.
        self.profile_arn = iam.create_instance_profile(InstanceProfileName="TrainingProfile", Path="/training-infra/")[
            "InstanceProfile"
        ]["Arn"]
        self.other_profile_arn = iam.create_instance_profile(InstanceProfileName="WebServers", Path="/")[
            "InstanceProfile"
        ]["Arn"]

    def launch(self, tags: dict[str, str], *, profile: str | None = "project", **extra) -> str:
        """Launch like `training-infra launch` does: with the project's instance profile unless told otherwise."""
        tag_spec = (
            [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}] if tags else []
        )
        if profile is not None:
            extra["IamInstanceProfile"] = {"Arn": self.profile_arn if profile == "project" else self.other_profile_arn}
        response = self.ec2.run_instances(
            ImageId=MOTO_AMI, InstanceType="g5.xlarge", MinCount=1, MaxCount=1, TagSpecifications=tag_spec, **extra
        )
        return response["Instances"][0]["InstanceId"]

    def instance(self, instance_id: str) -> dict:
        return self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]

    def launch_time(self, instance_id: str):
        return self.instance(instance_id)["LaunchTime"]

    def state(self, instance_id: str) -> str:
        return self.instance(instance_id)["State"]["Name"]

    def notices(self) -> list[dict]:
        """Every notice published so far (drained from the queue, so the next call sees only new ones)."""
        out = []
        while True:
            batch = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10).get("Messages", [])
            if not batch:
                return out
            for message in batch:
                out.append(json.loads(message["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])


@pytest.fixture
def aws(monkeypatch):
    """A fresh in-process moto account; TOPIC_ARN is set as the Lambda environment would set it."""
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        account = Aws()
        monkeypatch.setenv("TOPIC_ARN", account.topic_arn)
        monkeypatch.setenv("INSTANCE_PROFILE_ARN_PREFIX", PROFILE_ARN_PREFIX)
        yield account
