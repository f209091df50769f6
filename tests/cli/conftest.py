"""Fixtures for the `training-infra` command: a moto server, the four stacks deployed into it.

The stacks are tiny CloudFormation templates with the real output keys and the resources the
verbs touch (buckets, a VPC with a subnet per zone, a security group, a launch template carrying
rendered user data, a log group), created by moto's CloudFormation like `make deploy` would.
Each test module that lists every run gets its own region, so counts stay exact under xdist.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest
from typer.testing import CliRunner

from training_infra import naming
from training_infra.cli.main import app
from training_infra.compute import user_data as user_data_module
from training_infra.local.emulator import Emulator

IMAGE_ID = "ami-0123456789abcdef0"
# Nothing listens here: a verb that reached AWS would fail with exit 1, not a usage error.
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"
TEMPLATE_INSTANCE_TYPE = "g5.xlarge"
STACK_MAX_RUNTIME_SECONDS = 12 * 3600
STACK_INSTANCE_TYPES = (TEMPLATE_INSTANCE_TYPE, "g6.xlarge")
# The run table as the storage stack declares it (training_infra/supervisor/construct.py).
RUN_TABLE = {
    "Type": "AWS::DynamoDB::Table",
    "Properties": {
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": n, "AttributeType": "S"} for n in ("run_id", "active", "kind", "created_at")
        ],
        "KeySchema": [{"AttributeName": "run_id", "KeyType": "HASH"}],
        "GlobalSecondaryIndexes": [
            {
                "IndexName": "Active",
                "KeySchema": [{"AttributeName": "active", "KeyType": "HASH"}],
                "Projection": {"ProjectionType": "ALL"},
            },
            {
                "IndexName": "ByCreated",
                "KeySchema": [
                    {"AttributeName": "kind", "KeyType": "HASH"},
                    {"AttributeName": "created_at", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            },
        ],
    },
}


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> Iterator[Emulator]:
    with Emulator(tmp_path_factory.mktemp("moto-cli")) as aws:
        yield aws


def rendered_user_data() -> str:
    return user_data_module.render_user_data(
        user_data_module.AgentConfig(
            data_bucket="data-bucket",
            outputs_bucket="outputs-bucket",
            image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/training-infra",
            image_tag="latest",
            training_command="python train.py",
            max_runtime_seconds=STACK_MAX_RUNTIME_SECONDS,
            extra_env="STACK_LEVEL=1",
        ),
        user_data_module.AgentObject(bucket="cdk-assets", key="agent.xz", sha256="0" * 64),
    )


def stack_templates(
    user_data: str, region: str, *, use_spot: bool = True, published_zones: str = "", monthly_limit_usd: str = ""
) -> dict[str, dict[str, Any]]:
    """The four stacks with the outputs the real ones publish (GitHub roles and InstanceId left out).

    `published_zones` ("b"): publish the SubnetIds output with the subnets of those zones, as the
    real compute stack does; empty leaves it out, as an older stack would.
    """
    storage = {
        "Resources": {"Data": {"Type": "AWS::S3::Bucket"}, "Outputs": {"Type": "AWS::S3::Bucket"}, "Runs": RUN_TABLE},
        "Outputs": {
            naming.OUTPUT_TRAINING_BUCKET: {"Value": {"Ref": "Data"}},
            naming.OUTPUT_OUTPUTS_BUCKET: {"Value": {"Ref": "Outputs"}},
            naming.OUTPUT_RUN_TABLE: {"Value": {"Ref": "Runs"}},
        },
    }
    registry = {
        "Resources": {"Repo": {"Type": "AWS::ECR::Repository", "Properties": {"RepositoryName": "training-infra"}}},
        "Outputs": {naming.OUTPUT_ECR_REPOSITORY_URI: {"Value": {"Fn::GetAtt": ["Repo", "RepositoryUri"]}}},
    }
    safety = {
        "Resources": {"Topic": {"Type": "AWS::SNS::Topic"}},
        "Outputs": {naming.OUTPUT_ALERTS_TOPIC_ARN: {"Value": {"Ref": "Topic"}}},
    }
    subnets = {
        f"Subnet{index}": {
            "Type": "AWS::EC2::Subnet",
            "Properties": {
                "VpcId": {"Ref": "Vpc"},
                "CidrBlock": f"10.20.{index}.0/24",
                "AvailabilityZone": f"{region}{zone}",
                "MapPublicIpOnLaunch": True,
            },
        }
        for index, zone in enumerate("ab")
    }
    compute = {
        "Resources": {
            "Vpc": {"Type": "AWS::EC2::VPC", "Properties": {"CidrBlock": "10.20.0.0/16"}},
            **subnets,
            "InstanceRole": {
                "Type": "AWS::IAM::Role",
                "Properties": {
                    "AssumeRolePolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Action": "sts:AssumeRole",
                                "Principal": {"Service": "ec2.amazonaws.com"},
                            }
                        ],
                    }
                },
            },
            "InstanceProfile": {
                "Type": "AWS::IAM::InstanceProfile",
                "Properties": {"Path": "/training-infra/", "Roles": [{"Ref": "InstanceRole"}]},
            },
            "Group": {
                "Type": "AWS::EC2::SecurityGroup",
                "Properties": {"GroupDescription": "training instances (no ingress)", "VpcId": {"Ref": "Vpc"}},
            },
            "Template": {
                "Type": "AWS::EC2::LaunchTemplate",
                "Properties": {
                    "LaunchTemplateData": {
                        "ImageId": IMAGE_ID,
                        "InstanceType": TEMPLATE_INSTANCE_TYPE,
                        "SecurityGroupIds": [{"Ref": "Group"}],
                        "IamInstanceProfile": {"Arn": {"Fn::GetAtt": ["InstanceProfile", "Arn"]}},
                        "InstanceInitiatedShutdownBehavior": "terminate",
                        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 2},
                        "BlockDeviceMappings": [
                            {
                                "DeviceName": "/dev/sda1",
                                "Ebs": {"VolumeSize": 150, "VolumeType": "gp3", "Encrypted": True},
                            }
                        ],
                        **(
                            {
                                "InstanceMarketOptions": {
                                    "MarketType": "spot",
                                    "SpotOptions": {
                                        "SpotInstanceType": "one-time",
                                        "InstanceInterruptionBehavior": "terminate",
                                    },
                                }
                            }
                            if use_spot
                            else {}
                        ),
                        "UserData": {"Fn::Base64": user_data},
                        "TagSpecifications": [
                            {"ResourceType": "instance", "Tags": [{"Key": "project", "Value": "training-infra"}]},
                        ],
                    }
                },
            },
            "Logs": {"Type": "AWS::Logs::LogGroup", "Properties": {"LogGroupName": f"/training-infra/{region}/runs"}},
        },
        "Outputs": {
            naming.OUTPUT_LAUNCH_TEMPLATE_ID: {"Value": {"Ref": "Template"}},
            naming.OUTPUT_LOG_GROUP_NAME: {"Value": {"Ref": "Logs"}},
            naming.OUTPUT_INSTANCE_TYPES: {"Value": ",".join(STACK_INSTANCE_TYPES)},
            **({naming.OUTPUT_MONTHLY_LIMIT_USD: {"Value": monthly_limit_usd}} if monthly_limit_usd else {}),
            **(
                {
                    naming.OUTPUT_SUBNET_IDS: {
                        "Value": {"Fn::Join": [",", [{"Ref": f"Subnet{'ab'.index(z)}"} for z in published_zones]]}
                    }
                }
                if published_zones
                else {}
            ),
        },
    }
    return {
        naming.STORAGE_STACK: storage,
        naming.REGISTRY_STACK: registry,
        naming.SAFETY_STACK: safety,
        naming.COMPUTE_STACK: compute,
    }


@dataclass
class Deployment:
    """The stacks in one region of the emulator, and helpers to look at what the CLI did."""

    emulator: Emulator
    region: str
    outputs: dict[str, str]
    runner: CliRunner = field(default_factory=CliRunner)
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def env(self) -> dict[str, str]:
        return {**self.emulator.env, "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region, "COLUMNS": "250"}

    def client(self, service: str) -> Any:
        """The test's own view of the emulator (one client per service, creating them is slow)."""
        if service not in self._clients:
            self._clients[service] = boto3.client(
                service, region_name=self.region, endpoint_url=self.emulator.endpoint, **_fake_keys()
            )
        return self._clients[service]

    def cli(self, *args: str, env: dict[str, str] | None = None):
        """Run the command in-process, as a user would type it."""
        return self.runner.invoke(app, list(args), env={**self.env, **(env or {})}, catch_exceptions=False)

    def usage_error(self, *args: str) -> str:
        """Run the command with AWS unreachable; assert it stopped at a one-line usage error; return it.

        Exit 2 (exit 1 would mean it called AWS), nothing on stdout, `error: ...` on one line.
        """
        result = self.cli(*args, env={"AWS_ENDPOINT_URL": UNREACHABLE_ENDPOINT})
        assert result.exit_code == 2, result.output
        assert result.stdout == ""
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        return result.stderr

    @property
    def data_bucket(self) -> str:
        return self.outputs[naming.OUTPUT_TRAINING_BUCKET]

    @property
    def outputs_bucket(self) -> str:
        return self.outputs[naming.OUTPUT_OUTPUTS_BUCKET]

    def instance(self, instance_id: str) -> dict[str, Any]:
        return self.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]

    def run_instances(self, run_id: str) -> list[dict[str, Any]]:
        pages = self.client("ec2").describe_instances(
            Filters=[{"Name": f"tag:{naming.TAG_RUN_ID}", "Values": [run_id]}]
        )
        return [i for r in pages["Reservations"] for i in r["Instances"]]

    def put_status(self, status: dict[str, Any]) -> None:
        key = f"{naming.RUNS_PREFIX}{status['run_id']}/status.json"
        self.client("s3").put_object(Bucket=self.outputs_bucket, Key=key, Body=json.dumps(status).encode())


def _fake_keys() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "aws_session_token": "testing"}  # noqa: S106


# What a user has done before a launch passes the preflight: images pushed, a dataset uploaded.
PUSHED_TAGS = ("latest", "v2")
STAND_IN_MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {},
        "layers": [],
    }
)


def deploy(
    emulator: Emulator,
    region: str,
    *,
    use_spot: bool = True,
    published_zones: str = "",
    empty_data: bool = False,
    monthly_limit_usd: str = "",
) -> Deployment:
    cloudformation = boto3.client("cloudformation", region_name=region, endpoint_url=emulator.endpoint, **_fake_keys())
    outputs: dict[str, str] = {}
    templates = stack_templates(
        rendered_user_data(),
        region,
        use_spot=use_spot,
        published_zones=published_zones,
        monthly_limit_usd=monthly_limit_usd,
    )
    for name, template in templates.items():
        cloudformation.create_stack(StackName=name, TemplateBody=json.dumps(template))
        stack = cloudformation.describe_stacks(StackName=name)["Stacks"][0]
        assert stack["StackStatus"] == "CREATE_COMPLETE", stack
        outputs.update({o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])})
    deployment = Deployment(emulator=emulator, region=region, outputs=outputs)
    repository = outputs[naming.OUTPUT_ECR_REPOSITORY_URI].rsplit("/", 1)[-1]
    for tag in PUSHED_TAGS:
        deployment.client("ecr").put_image(repositoryName=repository, imageManifest=STAND_IN_MANIFEST, imageTag=tag)
    if not empty_data:
        deployment.client("s3").put_object(
            Bucket=deployment.data_bucket, Key=naming.DATA_PREFIX + "train.csv", Body=b"x\n"
        )
    return deployment


@pytest.fixture(scope="session")
def deployed(emulator) -> Callable[..., Deployment]:
    """`deployed("eu-west-1")`: the stacks in that region of the session's emulator (once per region).

    `use_spot=False` deploys a launch template without spot options, as `-c use_spot=false` does;
    `published_zones="b"` publishes the SubnetIds output (see `stack_templates`); `monthly_limit_usd="30"`
    publishes the MonthlyLimitUsd output, as `-c monthly_limit_usd=30` does; every deployment has the
    images PUSHED_TAGS and, unless `empty_data`, one object under data/.
    """
    cache: dict[str, Deployment] = {}

    def get(
        region: str,
        *,
        use_spot: bool = True,
        published_zones: str = "",
        monthly_limit_usd: str = "",
        empty_data: bool = False,
    ) -> Deployment:
        if region not in cache:
            cache[region] = deploy(
                emulator,
                region,
                use_spot=use_spot,
                published_zones=published_zones,
                monthly_limit_usd=monthly_limit_usd,
                empty_data=empty_data,
            )
        return cache[region]

    return get


@pytest.fixture(scope="session")
def stacks(deployed) -> Deployment:
    """The default deployment most tests share (each test uses its own run ids)."""
    return deployed("us-east-1")


class Ec2Faults:
    """A loopback proxy for EC2 that answers CreateFleet with a chosen per-pool error in every pool.

    Capacity and quota errors cannot be produced by moto; everything else is forwarded to it, so
    the CLI still talks real HTTP and botocore parses a real CreateFleet response (its errorSet).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.error_code = "InsufficientInstanceCapacity"
        self.fleet_calls: list[str] = []
        # zone id -> score: GetSpotPlacementScores (moto has none) answered in its documented shape when set.
        self.placement_scores: dict[str, int] = {}
        self.score_calls: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if b"Action=CreateFleet" in body:
                    proxy.fleet_calls.append(body.decode())
                    self._reply(200, _fleet_errors(body.decode(), proxy.error_code).encode(), "text/xml")
                    return
                if b"Action=GetSpotPlacementScores" in body and proxy.placement_scores:
                    proxy.score_calls.append(body.decode())
                    self._reply(200, _placement_scores(proxy.placement_scores).encode(), "text/xml")
                    return
                request = urllib.request.Request(proxy.upstream + self.path, data=body, method="POST")
                for name in ("Content-Type", "Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
                    if self.headers.get(name):
                        request.add_header(name, self.headers[name])
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback moto
                        self._reply(response.status, response.read(), response.headers.get("Content-Type", "text/xml"))
                except urllib.error.HTTPError as error:  # an AWS error answer (e.g. DryRunOperation) is passed on
                    self._reply(error.code, error.read(), error.headers.get("Content-Type", "text/xml"))

            def _reply(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _fleet_errors(request: str, code: str) -> str:
    """CreateFleet's answer when no pool can launch: an errorSet entry per override, no instances."""
    import re
    from urllib.parse import unquote

    fields = dict(pair.split("=", 1) for pair in request.split("&") if "=" in pair)
    market = unquote(fields.get("TargetCapacitySpecification.DefaultTargetCapacityType", "spot"))
    template = unquote(fields.get("LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateId", ""))
    items = []
    for index in sorted(
        {int(m) for m in re.findall(r"LaunchTemplateConfigs\.1\.Overrides\.(\d+)\.InstanceType", request)}
    ):
        instance_type = unquote(fields[f"LaunchTemplateConfigs.1.Overrides.{index}.InstanceType"])
        subnet = unquote(fields.get(f"LaunchTemplateConfigs.1.Overrides.{index}.SubnetId", ""))
        items.append(
            "<item><launchTemplateAndOverrides><launchTemplateSpecification>"
            f"<launchTemplateId>{template}</launchTemplateId><version>1</version></launchTemplateSpecification>"
            f"<overrides><instanceType>{instance_type}</instanceType><subnetId>{subnet}</subnetId></overrides>"
            f"</launchTemplateAndOverrides><lifecycle>{market}</lifecycle><errorCode>{code}</errorCode>"
            f"<errorMessage>injected {code} for the test</errorMessage></item>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><CreateFleetResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        "<requestId>00000000-0000-0000-0000-000000000000</requestId><fleetId>fleet-00000000-0000-0000-0000-000000000000</fleetId>"
        f"<errorSet>{''.join(items)}</errorSet><fleetInstanceSet/></CreateFleetResponse>"
    )


def _placement_scores(scores: dict[str, int]) -> str:
    """GetSpotPlacementScores' answer (EC2 API reference: spotPlacementScoreSet of region, zone id, score)."""
    items = "".join(
        f"<item><region>us-east-1</region><availabilityZoneId>{zone_id}</availabilityZoneId><score>{score}</score></item>"
        for zone_id, score in scores.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><GetSpotPlacementScoresResponse '
        'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>00000000-0000-0000-0000-000000000000</requestId>'
        f"<spotPlacementScoreSet>{items}</spotPlacementScoreSet></GetSpotPlacementScoresResponse>"
    )


@pytest.fixture
def ec2_faults(emulator) -> Iterator[Ec2Faults]:
    faults = Ec2Faults(emulator.endpoint)
    yield faults
    faults.close()


@pytest.fixture(autouse=True)
def _no_real_aws_config(monkeypatch, tmp_path) -> None:
    """Keep a developer's ~/.aws out of the tests."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the price cache, never the user's
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
