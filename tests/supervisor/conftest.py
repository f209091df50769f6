"""One in-process moto account for the supervisor: the run table, a VPC with two zones, the launch
template, the outputs bucket and an alert topic with a queue subscribed (to read the notices)."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from moto import mock_aws

from training_infra import naming
from training_infra.local.events import ec2_event
from training_infra.local.moto_server import teach_instance_profiles
from training_infra.supervisor.runtime.records import ACTIVE_INDEX, CREATED_INDEX, Run, RunSpec, iso
from training_infra.supervisor.runtime.run_requests import SEAL_EXPORT, insert_overrides, run_seal
from training_infra.supervisor.runtime.supervisor import Clients, Supervisor, SupervisorConfig

REGION = "us-east-1"
MOTO_AMI = "ami-12c6146b"
START = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
# What render_user_data writes, in short: the stack's exports, the marker, the bootstrap.
STACK_USER_DATA = (
    "#!/bin/bash\nexport TI_MAX_RUNTIME_SECONDS=43200\nexport TI_CHECKPOINT_SYNC_SECONDS=300\n"
    "export TI_IMAGE_TAG=latest\nexport TI_EXTRA_ENV='STACK_LEVEL=1'\n#@run-overrides\necho bootstrap\n"
)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class Account:
    """A fresh moto account with everything a managed run touches."""

    def __init__(self) -> None:
        self.ec2 = boto3.client("ec2", region_name=REGION)
        self.dynamodb = boto3.client("dynamodb", region_name=REGION)
        self.s3 = boto3.client("s3", region_name=REGION)
        self.sns = boto3.client("sns", region_name=REGION)
        self.sqs = boto3.client("sqs", region_name=REGION)
        self.cloudwatch = boto3.client("cloudwatch", region_name=REGION)
        self.table = "runs"
        self.dynamodb.create_table(
            TableName=self.table,
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[
                {"AttributeName": n, "AttributeType": "S"} for n in ("run_id", "active", "kind", "created_at")
            ],
            KeySchema=[{"AttributeName": "run_id", "KeyType": "HASH"}],
            GlobalSecondaryIndexes=[
                {
                    "IndexName": ACTIVE_INDEX,
                    "KeySchema": [{"AttributeName": "active", "KeyType": "HASH"}],
                    "Projection": {"ProjectionType": "ALL"},
                },
                {
                    "IndexName": CREATED_INDEX,
                    "KeySchema": [
                        {"AttributeName": "kind", "KeyType": "HASH"},
                        {"AttributeName": "created_at", "KeyType": "RANGE"},
                    ],
                    "Projection": {"ProjectionType": "ALL"},
                },
            ],
        )
        self.bucket = "outputs"
        self.s3.create_bucket(Bucket=self.bucket)
        vpc = self.ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        self.subnets = {
            zone: self.ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"]["SubnetId"]
            for zone, cidr in (("us-east-1a", "10.0.1.0/24"), ("us-east-1b", "10.0.2.0/24"))
        }
        self.security_group = self.ec2.create_security_group(GroupName="training", Description="no ingress", VpcId=vpc)[
            "GroupId"
        ]
        self.iam = boto3.client("iam", region_name=REGION)
        self.iam.create_role(RoleName="instance", AssumeRolePolicyDocument="{}")
        self.profile_arn = self.iam.create_instance_profile(InstanceProfileName="training", Path="/training-infra/")[
            "InstanceProfile"
        ]["Arn"]
        self.iam.add_role_to_instance_profile(InstanceProfileName="training", RoleName="instance")
        # The stack's launch template as the compute stack deploys it (its default version is what runs copy).
        self.stack_data = {
            "ImageId": MOTO_AMI,
            "SecurityGroupIds": [self.security_group],
            "IamInstanceProfile": {"Arn": self.profile_arn},
            "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 100, "VolumeType": "gp3"}}],
            "UserData": base64.b64encode(STACK_USER_DATA.encode()).decode(),
        }
        self.stack_template_id = self.ec2.create_launch_template(
            LaunchTemplateName="stack-template", LaunchTemplateData=self.stack_data
        )["LaunchTemplate"]["LaunchTemplateId"]
        self.templates: dict[str, str] = {}
        self.topic_arn = self.sns.create_topic(Name="alerts")["TopicArn"]
        self.queue_url = self.sqs.create_queue(QueueName="inbox")["QueueUrl"]
        queue_arn = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        self.sns.subscribe(TopicArn=self.topic_arn, Protocol="sqs", Endpoint=queue_arn)
        self.clock = Clock()
        self.cfg = SupervisorConfig(
            table=self.table, outputs_bucket=self.bucket, topic_arn=self.topic_arn,
            launch_template_id=self.stack_template_id, subnet_ids=",".join(self.subnets.values()),
            security_group_id=self.security_group, instance_profile_arn=self.profile_arn,
            allowed_instance_types="g4dn.*,g5.*,g6.*,c6i.*", max_runtime_hours=48,
        )  # fmt: skip

    @property
    def template_id(self) -> str:
        return self.templates["bert"]

    def run_template(self, run: Run) -> str:
        """The launch template the supervisor makes for a run: the stack template's default version with the run's
        overrides and seal in its user data, its name prefix, created-by and run-id tags."""
        if run.run_id not in self.templates:
            overrides = {"TI_RUN_ID": run.run_id, "TI_DEADLINE_AT": run.deadline_at,
                         SEAL_EXPORT: run_seal(run.spec, run.deadline_at)}  # fmt: skip
            user_data = insert_overrides(STACK_USER_DATA, overrides).encode()
            data = {**self.stack_data, "UserData": base64.b64encode(user_data).decode()}
            tags = {naming.TAG_CREATED_BY: "supervisor", naming.TAG_RUN_ID: run.run_id, naming.TAG_MANAGED: "true"}
            self.templates[run.run_id] = self.ec2.create_launch_template(
                LaunchTemplateName=f"{naming.RUN_TEMPLATE_PREFIX}{run.run_id}",
                LaunchTemplateData=data,
                TagSpecifications=[{"ResourceType": "launch-template",
                                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
            )["LaunchTemplate"]["LaunchTemplateId"]  # fmt: skip
        return self.templates[run.run_id]

    def clients(self, ec2=None) -> Clients:
        return Clients(
            ec2=ec2 or self.ec2, dynamodb=self.dynamodb, s3=self.s3, sns=self.sns, cloudwatch=self.cloudwatch
        )

    def supervisor(self, ec2=None) -> Supervisor:
        return Supervisor(self.clients(ec2), self.cfg, now=self.clock)

    def new_run(self, run_id: str = "bert", **spec) -> Run:
        full = {
            "instance_types": ["g5.xlarge", "g6.xlarge"],
            "subnet_ids": list(self.subnets.values()),
            "market": "spot",
            "max_restarts_on_errors": 0,
            "launch_template_version": "1",
            "owns_launch_template": True,
            "max_runtime_hours": 24,
            "checkpoint_sync_seconds": 300,
            **spec,
        }
        made_here = "launch_template_id" not in full
        full.setdefault("launch_template_id", "lt-00000000")
        hours = full["max_runtime_hours"]
        deadline = iso(self.clock() + timedelta(hours=hours))
        # As `launch` records them: the run's tags from naming.run_tags, the one place they are built.
        run_tags = naming.run_tags(run_id, max_runtime_hours=hours, deadline=deadline)
        full.setdefault("instance_tags", {**run_tags, "Name": naming.instance_name(run_id)})
        run = Run(run_id=run_id, spec=RunSpec.from_dict(full), created_at=iso(self.clock()), deadline_at=deadline)
        if made_here:
            run.spec = dataclasses.replace(run.spec, launch_template_id=self.run_template(run))
        self.supervisor().store.create(run)
        return run

    def run(self, run_id: str = "bert") -> Run:
        return self.supervisor().store.get(run_id)

    def instances_of(self, run_id: str) -> list[dict]:
        reservations = self.ec2.describe_instances(Filters=[{"Name": "tag:training-infra:run-id", "Values": [run_id]}])[
            "Reservations"
        ]
        return [i for r in reservations for i in r["Instances"]]

    def agent_wrote(self, run_id: str, attempt: int, outcome: str, exit_code: int | None = None) -> None:
        """What the agent leaves at the end of an attempt (docs/agent.md, status.json)."""
        status = {"run_id": run_id, "attempt": attempt, "outcome": outcome, "exit_code": exit_code,
                  "ended_at": iso(self.clock()), "hourly_price_usd": 1.006, "estimated_cost_usd": 0.5,
                  "message": f"trainer {outcome}"}  # fmt: skip
        self.s3.put_object(
            Bucket=self.bucket, Key=f"runs/{run_id}/attempts/{attempt}/status.json", Body=json.dumps(status).encode()
        )

    def end_instance(self, instance_id: str) -> None:
        self.ec2.terminate_instances(InstanceIds=[instance_id])

    def notices(self) -> list[str]:
        out = []
        while True:
            messages = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10).get("Messages", [])
            if not messages:
                return out
            for message in messages:
                out.append(json.loads(message["Body"])["Message"])
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])


def start(account, **spec):
    """A new run "bert" (spec overrides) after its first reconcile: launched."""
    account.new_run(**spec)
    account.supervisor().reconcile("bert")
    return account.run()


def agent_metric(account, metric: str, dimension: tuple[str, str], minutes_ago: float, value: float = 1.0) -> None:
    """One data point as the agent puts it (GPUUtilization by InstanceId, Progress by RunId)."""
    account.cloudwatch.put_metric_data(
        Namespace="TrainingInfra",
        MetricData=[{
            "MetricName": metric, "Dimensions": [{"Name": dimension[0], "Value": dimension[1]}],
            "Value": value, "Timestamp": account.clock() - timedelta(minutes=minutes_ago),
        }],
    )  # fmt: skip


def event(detail_type: str, instance_id: str = "", **detail) -> dict:
    """The envelope EventBridge delivers, with the given detail (training_infra/local/events.py)."""
    return ec2_event(detail_type, instance_id, region=REGION, time=START, **detail)


@pytest.fixture
def account():
    teach_instance_profiles()  # instances from a template carry its profile, as on AWS
    with mock_aws():
        yield Account()
