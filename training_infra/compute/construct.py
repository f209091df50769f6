"""The GPU box: network, least-privilege role, launch template with the agent, and (optionally) the instance."""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jsii
from aws_cdk import ArnFormat, Aws, Duration, Fn, RemovalPolicy, Stack, Tags
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_sns as sns
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from training_infra import naming
from training_infra.compute.user_data import AgentConfig, AgentObject, pack_agent, render_user_data, with_run_overrides
from training_infra.policy import acknowledge_nag, grant_encrypted_publish, log_retention, nag_name, skip_checkov
from training_infra.pricing import on_demand_price

# Interface endpoints the agent and Session Manager need when instances have no public IP.
PRIVATE_ENDPOINTS = {
    "Ssm": ec2.InterfaceVpcEndpointAwsService.SSM,
    "SsmMessages": ec2.InterfaceVpcEndpointAwsService.SSM_MESSAGES,
    "Ec2Messages": ec2.InterfaceVpcEndpointAwsService.EC2_MESSAGES,
    "EcrApi": ec2.InterfaceVpcEndpointAwsService.ECR,
    "EcrDocker": ec2.InterfaceVpcEndpointAwsService.ECR_DOCKER,
    "Logs": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS,
    "Monitoring": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_MONITORING,
    "Sns": ec2.InterfaceVpcEndpointAwsService.SNS,
    # The secrets reader role's session (launch --secret) and the trainer role's (trainer_s3_access).
    "Sts": ec2.InterfaceVpcEndpointAwsService.STS,
    "SecretsManager": ec2.InterfaceVpcEndpointAwsService.SECRETS_MANAGER,
}


# Every packed agent in the bootstrap bucket: CDK names a file asset `<sha256>.<extension>` (agent.tar.xz: `.xz`).
AGENT_OBJECTS = "*.xz"
# A launch template's first version: what the run's template held when the run started.
FROZEN_TEMPLATE_VERSION = "1"
# One hop: only the host (the agent) reaches IMDS, never a container behind the docker bridge,
# so the trainer cannot read the instance role's credentials (the agent passes it the region).
IMDS_HOP_LIMIT = 1
# What SSM Session Manager needs on the instance (AWS's own minimum for Session Manager, the
# AWSCloud9SSMInstanceProfile managed policy), plus the SSM agent's ec2messages command channel,
# which it polls whether or not Run Command is used. No Parameter Store, documents or inventory.
SESSION_CHANNEL_ACTIONS = (
    "ssmmessages:CreateControlChannel",
    "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
)
SSM_AGENT_MESSAGE_ACTIONS = (
    "ec2messages:AcknowledgeMessage",
    "ec2messages:DeleteMessage",
    "ec2messages:FailMessage",
    "ec2messages:GetEndpoint",
    "ec2messages:GetMessages",
    "ec2messages:SendReply",
)
# The trainer role's sessions are short; the agent refreshes them (role chaining caps them at 1 h).
TRAINER_SESSION = Duration.hours(1)
# Where the secrets reader role may use KMS keys (kms:ViaService): SecureString parameters and secrets.
SECRET_SERVICES = ("ssm", "secretsmanager")
# The bucket ECR keeps image layers in; pulls through the S3 gateway endpoint read from it.
ECR_LAYER_BUCKET = "prod-{region}-starport-layer-bucket"
# AWS's own runbook that removes every rule of a VPC's default security group (no Lambda of ours).
EMPTY_DEFAULT_SG_RUNBOOK = "AWSConfigRemediation-RemoveVPCDefaultSecurityGroupRules"
# What the training instances do with S3 (the agent's sync/cp and a trainer's reads and writes).
S3_ENDPOINT_ACTIONS = (
    "s3:AbortMultipartUpload",
    "s3:DeleteObject",
    "s3:GetBucketLocation",
    "s3:GetObject",
    "s3:GetObjectVersion",
    "s3:ListBucket",
    "s3:ListBucketVersions",
    "s3:PutObject",
)


@jsii.implements(ec2.IMachineImage)
class PinnedImage:
    """A literal AMI id: env-agnostic (no region map) and what the local emulator needs."""

    def __init__(self, image_id: str) -> None:
        self.image_id = image_id

    def get_image(self, scope: Construct) -> ec2.MachineImageConfig:
        return ec2.MachineImageConfig(
            image_id=self.image_id, os_type=ec2.OperatingSystemType.LINUX, user_data=ec2.UserData.for_linux()
        )


@dataclass(frozen=True)
class NetworkProps:
    """Where instances live: a new VPC (default) or an existing one with named subnets."""

    vpc_id: str = ""
    subnet_ids: tuple[str, ...] = ()
    private_networking: bool = False  # isolated subnets + interface endpoints, no public IPs
    availability_zones: tuple[str, ...] = ()


@dataclass(frozen=True)
class InstanceProps:
    """What the launch template (and the optional instance) is made of."""

    ami_parameter: str  # SSM parameter that holds the AMI id, used when image_id is empty
    instance_type: str = "g5.xlarge"
    use_spot: bool = True
    spot_max_price: str = ""  # USD/hour; empty: up to the on-demand price
    auto_shutdown: bool = True  # power-off terminates (never halt: a halted box keeps billing)
    volume_size_gb: int = 150
    image_id: str = ""


@dataclass(frozen=True)
class RunDefaults:
    """What a run does unless `training-infra launch` says otherwise (the agent's TI_* settings)."""

    image_tag: str = "latest"
    training_command: str = ""
    max_runtime_hours: float = 12
    idle_minutes: int = 30
    idle_gpu_percent: float = 5
    stall_minutes: int = 20
    checkpoint_sync_seconds: int = 300
    data_access: str = "sync"  # sync | mount (Mountpoint for Amazon S3, read-only)


@dataclass(frozen=True)
class ComputeProps:
    """The settings the compute construct reads (built from Settings in stacks.py)."""

    network: NetworkProps
    instance: InstanceProps
    run: RunDefaults
    create_instance: bool = False  # the seed's path: CloudFormation owns one training instance
    run_id: str = ""  # that instance's run; a new one asks for a new instance
    log_retention_days: int = 30
    # Opt-in: a separate trainer role the agent assumes (session-tagged with the run id) and whose
    # short-lived credentials it hands to the container; the instance role never reaches it.
    trainer_s3_access: bool = False


class TrainingCompute(Construct):
    """Everything a run needs at rest costs nothing: no NAT, no endpoints by default, no instance unless asked.

    Takes the buckets, repository and topic as interfaces and grants itself only what the agent
    uses; the storage grant (`TrainingStorage.grant_run_access`) is wired by the compute stack.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        props: ComputeProps,
        data_bucket: s3.IBucket,
        outputs_bucket: s3.IBucket,
        repository: ecr.IRepository,
        alerts_topic: sns.ITopic,
    ) -> None:
        super().__init__(scope, construct_id)
        self.vpc, self.subnet_ids = self._network(props.network)
        self.security_group = ec2.SecurityGroup(
            self,
            "InstanceSecurityGroup",
            vpc=self.vpc,
            description="Training instances: no ingress (shell through SSM); HTTPS out to AWS APIs and registries",
            allow_all_outbound=False,
        )
        self.security_group.add_egress_rule(
            ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "HTTPS to AWS APIs (S3, ECR, SSM, Logs)"
        )
        # No rule between training instances: a gang's members reach each other through a security group of
        # their attempt's own, made by the supervisor (docs/architecture.md, "Multi-node runs": the network).
        if props.network.private_networking:
            self._private_endpoints()

        self.log_group = logs.LogGroup(
            self,
            "TrainingLogs",
            retention=log_retention(props.log_retention_days),
            # Every run's logs are also uploaded to the outputs bucket; this group is the live view.
            removal_policy=RemovalPolicy.DESTROY,
        )
        skip_checkov(
            self.log_group,
            "CKV_AWS_158",
            "CloudWatch Logs encrypts at rest by default; training logs hold no secrets and are copied to the "
            "encrypted outputs bucket",
        )

        self.role = iam.Role(
            self,
            "InstanceRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="Training instance: SSM shell, pull its image, read data, write runs and checkpoints",
        )
        # Every run is launched with this profile; its path is the reaper's second key (with the tag).
        self.instance_profile = iam.InstanceProfile(
            self, "InstanceProfile", role=self.role, path=naming.INSTANCE_PROFILE_PATH
        )
        self._grant_instance_access(repository=repository, alerts_topic=alerts_topic)
        self.secrets_reader_role = self._secrets_reader_role()
        self.trainer_role: iam.Role | None = self._trainer_role() if props.trainer_s3_access else None

        instance = props.instance
        run = props.run
        agent = AgentConfig(
            data_bucket=data_bucket.bucket_name,
            outputs_bucket=outputs_bucket.bucket_name,
            image_uri=repository.repository_uri,
            image_tag=run.image_tag,
            training_command=run.training_command,
            run_id=props.run_id,
            region=Aws.REGION,
            log_group=self.log_group.log_group_name,
            alerts_topic_arn=alerts_topic.topic_arn,
            metric_namespace=naming.METRIC_NAMESPACE,
            max_runtime_seconds=int(run.max_runtime_hours * 3600),
            auto_shutdown=instance.auto_shutdown,
            idle_seconds=run.idle_minutes * 60,
            idle_gpu_percent=run.idle_gpu_percent,
            stall_seconds=run.stall_minutes * 60,
            checkpoint_sync_seconds=run.checkpoint_sync_seconds,
            data_access=run.data_access,
            market="spot" if instance.use_spot else "on-demand",
            hourly_price_usd=on_demand_price(instance.instance_type) or 0.0,
            # trainer_s3_access: the agent hands the container this role's short sessions; else no credentials.
            trainer_role_arn=self.trainer_role.role_arn if self.trainer_role is not None else "",
            secrets_reader_role_arn=self.secrets_reader_role.role_arn,
        )
        self.user_data_script = render_user_data(agent, self._agent_object())
        self.machine_image = (
            PinnedImage(instance.image_id)
            if instance.image_id
            else ec2.MachineImage.from_ssm_parameter(instance.ami_parameter, os=ec2.OperatingSystemType.LINUX)
        )

        # What `training-infra launch` starts runs from; it follows the newest AMI and settings.
        self.launch_template = self._launch_template("LaunchTemplate", instance, user_data=self.user_data_script)
        run_id = props.run_id or "default"
        tags = naming.run_tags(run_id, max_runtime_hours=run.max_runtime_hours)
        for key, value in tags.items():
            Tags.of(self.launch_template).add(key, value)

        self.instance: ec2.CfnInstance | None = None
        self.run_launch_template: ec2.LaunchTemplate | None = None
        self.alarms: tuple[cloudwatch.Alarm, ...] = ()
        if props.create_instance:
            self.instance = self._instance(props, run_id=run_id, tags=tags, alerts_topic=alerts_topic)

    def _agent_object(self) -> AgentObject:
        """The packed agent as a file asset (cdk deploy uploads it to the bootstrap bucket); user data pins
        its sha256, so only the agent it names ever runs.

        The instance role reads the agents (`<hash>.xz` objects of the bootstrap bucket), not just this
        deploy's: a run launched before a deploy that changed the agent keeps its own template, whose
        relaunches must still fetch the agent they pin."""
        packed = pack_agent()
        digest = hashlib.sha256(packed).hexdigest()
        # A folder named by the content: the same agent is the same path, synth after synth.
        staged = Path(tempfile.gettempdir()) / f"training-infra-agent-{digest[:16]}" / "agent.tar.xz"
        if not staged.exists() or staged.read_bytes() != packed:
            staged.parent.mkdir(parents=True, exist_ok=True)
            staged.write_bytes(packed)
        self.agent_asset = s3_assets.Asset(self, "Agent", path=str(staged))
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadTheAgent",
                actions=["s3:GetObject"],
                resources=[self.agent_asset.bucket.arn_for_objects(AGENT_OBJECTS)],
            )
        )
        acknowledge_nag(
            self.role,
            f"IAM5[Resource::{nag_name(self, self.agent_asset.bucket.arn_for_objects(AGENT_OBJECTS))}]",
            "The packed agents of the bootstrap bucket (<sha256>.xz): a run launched before a deploy that changed "
            "the agent relaunches with the one its template pins; user data checks the sha256, so no other object "
            "ever runs",
        )
        return AgentObject(bucket=self.agent_asset.s3_bucket_name, key=self.agent_asset.s3_object_key, sha256=digest)

    def _network(self, network: NetworkProps) -> tuple[ec2.IVpc, list[str]]:
        if network.vpc_id:
            # No lookups at synth: the subnets are named in the settings.
            vpc = ec2.Vpc.from_vpc_attributes(
                self,
                "Vpc",
                vpc_id=network.vpc_id,
                availability_zones=Fn.get_azs(),
                public_subnet_ids=list(network.subnet_ids),
            )
            return vpc, list(network.subnet_ids)
        subnet_type = ec2.SubnetType.PRIVATE_ISOLATED if network.private_networking else ec2.SubnetType.PUBLIC
        vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr("10.42.0.0/16"),
            # Spot capacity differs per AZ: give the scheduler every zone it is told about.
            availability_zones=list(network.availability_zones) or None,
            max_azs=None if network.availability_zones else 3,
            nat_gateways=0,
            subnet_configuration=[ec2.SubnetConfiguration(name="Training", subnet_type=subnet_type, cidr_mask=20)],
            gateway_endpoints={"S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)},
            restrict_default_security_group=False,  # True needs a Lambda custom resource; the default SG is unused
        )
        self._limit_s3_endpoint(vpc.node.find_child("S3"))
        self._empty_default_security_group(vpc)
        if network.availability_zones:
            # The zones are the user's explicit choice (spot capacity), not an accident of a template.
            for subnet in vpc.public_subnets + vpc.isolated_subnets:
                subnet.node.default_child.add_metadata("cfn-lint", {"config": {"ignore_checks": ["W3010"]}})
        flow_log_group = logs.LogGroup(
            self, "FlowLogs", retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY
        )
        skip_checkov(
            flow_log_group,
            "CKV_AWS_158",
            "CloudWatch Logs encrypts at rest by default; flow logs of rejected packets hold no payloads",
        )
        vpc.add_flow_log(
            "FlowLog",
            destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_log_group),
            traffic_type=ec2.FlowLogTrafficType.REJECT,
        )
        return vpc, vpc.select_subnets(subnet_type=subnet_type).subnet_ids

    def _limit_s3_endpoint(self, endpoint: ec2.GatewayVpcEndpoint) -> None:
        """Through the gateway endpoint: this account's buckets and ECR's layer bucket, nothing else.

        Credentials that reach the box (any account's) cannot move data to a bucket outside the
        account through the VPC's S3 route.
        """
        stack = Stack.of(self)
        endpoint.add_to_policy(
            iam.PolicyStatement(
                sid="ThisAccountsBuckets",
                principals=[iam.AnyPrincipal()],
                actions=list(S3_ENDPOINT_ACTIONS),
                resources=["*"],
                conditions={"StringEquals": {"aws:ResourceAccount": stack.account}},
            )
        )
        layer_bucket = ECR_LAYER_BUCKET.format(region=stack.region)
        endpoint.add_to_policy(
            iam.PolicyStatement(
                sid="EcrImageLayers",
                principals=[iam.AnyPrincipal()],
                actions=["s3:GetObject"],
                resources=[f"arn:{stack.partition}:s3:::{layer_bucket}/*"],
            )
        )

    def _empty_default_security_group(self, vpc: ec2.Vpc) -> None:
        """Remove the default security group's rules (all traffic within the group, all out) once, at creation.

        CloudFormation cannot revoke rules it did not create, and CDK's `restrict_default_security_group`
        needs a Lambda custom resource (which the local AWS cannot run). A State Manager association
        runs AWS's own runbook instead, once, with a role that may revoke rules of this group only.
        Nothing uses the group (instances and endpoints have their own); this keeps a resource that
        someone attaches it to later from talking to everything else that carries it.
        """
        stack = Stack.of(self)
        group_arn = stack.format_arn(
            service="ec2", resource="security-group", resource_name=vpc.vpc_default_security_group
        )
        role = iam.Role(
            self,
            "DefaultSecurityGroupRole",
            description="Systems Manager Automation: remove the rules of this VPC's default security group, once",
            assumed_by=iam.PrincipalWithConditions(
                iam.ServicePrincipal("ssm.amazonaws.com"), {"StringEquals": {"aws:SourceAccount": stack.account}}
            ),
            max_session_duration=Duration.hours(1),
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["ec2:RevokeSecurityGroupIngress", "ec2:RevokeSecurityGroupEgress"], resources=[group_arn]
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["ec2:DescribeSecurityGroups"],
                resources=["*"],  # DescribeSecurityGroups has no resource-level permissions
            )
        )
        # The runbook's documented needs: start itself and read its own execution.
        runbook = (
            f"arn:{stack.partition}:ssm:{stack.region}:{stack.account}:"
            f"automation-definition/{EMPTY_DEFAULT_SG_RUNBOOK}:*"
        )
        executions = stack.format_arn(service="ssm", resource="automation-execution", resource_name="*")
        role.add_to_policy(iam.PolicyStatement(actions=["ssm:StartAutomationExecution"], resources=[runbook]))
        role.add_to_policy(iam.PolicyStatement(actions=["ssm:GetAutomationExecution"], resources=[executions]))
        acknowledge_nag(
            role,
            "IAM5[Resource::*]",
            "ec2:DescribeSecurityGroups has no resource-level permissions; the runbook reads the group before "
            "revoking its rules",
        )
        for resource, why in (
            (runbook, "any version of the one AWS runbook this role exists for"),
            (executions, "execution ids are made when the association runs"),
        ):
            acknowledge_nag(role, f"IAM5[Resource::{nag_name(role, resource)}]", f"Systems Manager Automation: {why}")
        association = ssm.CfnAssociation(
            self,
            "EmptyDefaultSecurityGroup",
            name=EMPTY_DEFAULT_SG_RUNBOOK,
            parameters={"GroupId": [vpc.vpc_default_security_group], "AutomationAssumeRole": [role.role_arn]},
        )
        # The GetAtt already orders the role first; the policy must exist too before the runbook runs.
        association.add_dependency(role.node.find_child("DefaultPolicy").node.default_child)

    def _private_endpoints(self) -> None:
        """Interface endpoints reachable only from the training instances' security group."""
        endpoint_sg = ec2.SecurityGroup(
            self,
            "EndpointSecurityGroup",
            vpc=self.vpc,
            description="VPC endpoints: HTTPS from training instances only",
            allow_all_outbound=False,
        )
        endpoint_sg.add_ingress_rule(self.security_group, ec2.Port.tcp(443), "HTTPS from training instances")
        for name, service in PRIVATE_ENDPOINTS.items():
            self.vpc.add_interface_endpoint(
                name,
                service=service,
                private_dns_enabled=True,
                open=False,
                security_groups=[endpoint_sg],
                subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED),
            )

    def _grant_instance_access(self, *, repository: ecr.IRepository, alerts_topic: sns.ITopic) -> None:
        repository.grant_pull(self.role)
        self.log_group.grant_write(self.role)
        grant_encrypted_publish(self.role, alerts_topic, alerts_topic.master_key)
        self._grant_session_manager()
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="PutMetricsInProjectNamespace",
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],  # PutMetricData has no resource type; the namespace condition scopes it
                conditions={"StringEquals": {"cloudwatch:namespace": naming.METRIC_NAMESPACE}},
            )
        )
        acknowledge_nag(
            self.role,
            "IAM5[Resource::*]",
            "Only actions without resource types: ecr:GetAuthorizationToken (from grant_pull), "
            "cloudwatch:PutMetricData (limited by a namespace condition) and the SSM agent's "
            "ssmmessages/ec2messages channels",
        )

    def _grant_session_manager(self) -> None:
        """Session Manager shells, instead of AmazonSSMManagedInstanceCore (which reads every SSM parameter)."""
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="SsmAgentChannels",
                actions=[*SESSION_CHANNEL_ACTIONS, *SSM_AGENT_MESSAGE_ACTIONS],
                resources=["*"],  # ssmmessages and ec2messages have no resource types
            )
        )
        instances = Stack.of(self).format_arn(service="ec2", resource="instance", resource_name="*")
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="SsmAgentRegistersThisInstance", actions=["ssm:UpdateInstanceInformation"], resources=[instances]
            )
        )
        acknowledge_nag(
            self.role,
            f"IAM5[Resource::{nag_name(self, instances)}]",
            "ssm:UpdateInstanceInformation names the calling instance, whose id is unknown at deploy: instances "
            "of this account and region",
        )

    def _secrets_reader_role(self) -> iam.Role:
        """`launch --secret`: a role that reads SSM parameters under /training-infra/ and secrets tagged managed.

        Only the instance role may assume it, and the agent does so with a session policy naming
        the run's own references, so a run reads only the names it was given; the instance role
        itself reads no parameter and no secret.
        """
        stack = Stack.of(self)
        reader = iam.Role(
            self,
            "SecretsReaderRole",
            description="Agent at run start (launch --secret): read the run's named trainer secrets, then dropped",
            assumed_by=iam.ArnPrincipal(self.role.role_arn),
            max_session_duration=Duration.hours(1),
        )
        parameters = stack.format_arn(
            service="ssm", resource="parameter", resource_name=naming.SECRETS_PARAMETER_PATH.strip("/") + "/*"
        )
        reader.add_to_policy(
            iam.PolicyStatement(sid="ReadTrainerSecretParameters", actions=["ssm:GetParameter"], resources=[parameters])
        )
        reader.add_to_policy(
            iam.PolicyStatement(
                sid="ReadTrainerSecretsTaggedManaged",
                actions=["secretsmanager:GetSecretValue"],
                resources=[
                    stack.format_arn(
                        service="secretsmanager",
                        resource="secret",
                        resource_name="*",
                        arn_format=ArnFormat.COLON_RESOURCE_NAME,
                    )
                ],
                conditions={"StringEquals": {f"secretsmanager:ResourceTag/{naming.TAG_MANAGED}": "true"}},
            )
        )
        keys = stack.format_arn(service="kms", resource="key", resource_name="*")
        reader.add_to_policy(
            iam.PolicyStatement(
                sid="DecryptThroughSsmAndSecretsManagerOnly",
                actions=["kms:Decrypt"],
                resources=[keys],
                conditions={
                    "StringEquals": {
                        "kms:ViaService": [
                            f"{service}.{stack.region}.{stack.url_suffix}" for service in SECRET_SERVICES
                        ]
                    }
                },
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(sid="AssumeSecretsReaderRole", actions=["sts:AssumeRole"], resources=[reader.role_arn])
        )
        acknowledge_nag(
            reader,
            f"IAM5[Resource::{nag_name(self, parameters)}]",
            "Trainer secrets (launch --secret) are the user's own parameters, named at launch: only those under "
            "/training-infra/; each session's policy names the run's own parameters.",
        )
        acknowledge_nag(
            reader,
            "IAM5[Resource::arn:<AWS::Partition>:secretsmanager:<AWS::Region>:<AWS::AccountId>:secret:*]",
            "Trainer secrets (launch --secret) are named at launch; GetSecretValue is limited to secrets tagged "
            "training-infra:managed=true, and each session's policy names the run's own secrets.",
        )
        acknowledge_nag(
            reader,
            f"IAM5[Resource::{nag_name(self, keys)}]",
            "Customer-managed keys of SecureString parameters and secrets are the user's; kms:Decrypt only "
            "through SSM and Secrets Manager (kms:ViaService).",
        )
        return reader

    def _trainer_role(self) -> iam.Role:
        """The opt-in trainer role: assumed by the agent with the run id as a session tag, nothing else.

        The storage construct's `grant_trainer_access` scopes it to data/ and to the run's own
        prefixes through `${aws:PrincipalTag/training-infra:run-id}`; the trust refuses a session
        without that tag or with any other tag key.
        """
        trainer = iam.Role(
            self,
            "TrainerRole",
            description=(
                "Trainer container (opt-in): read data/, write only its own run's runs/ and checkpoints/ prefixes"
            ),
            assumed_by=iam.PrincipalWithConditions(
                iam.SessionTagsPrincipal(iam.ArnPrincipal(self.role.role_arn)),
                {
                    "StringLike": {f"aws:RequestTag/{naming.TAG_RUN_ID}": "?*"},
                    "ForAllValues:StringEquals": {"aws:TagKeys": [naming.TAG_RUN_ID]},
                },
            ),
            max_session_duration=TRAINER_SESSION,
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="AssumeTrainerRoleWithRunTag",
                actions=["sts:AssumeRole", "sts:TagSession"],
                resources=[trainer.role_arn],
            )
        )
        return trainer

    def _launch_template(self, construct_id: str, instance: InstanceProps, *, user_data: str) -> ec2.LaunchTemplate:
        return ec2.LaunchTemplate(
            self,
            construct_id,
            machine_image=self.machine_image,
            instance_type=ec2.InstanceType(instance.instance_type),
            instance_profile=self.instance_profile,
            security_group=self.security_group,
            user_data=ec2.UserData.custom(user_data),
            require_imdsv2=True,
            http_put_response_hop_limit=IMDS_HOP_LIMIT,
            instance_metadata_tags=True,
            instance_initiated_shutdown_behavior=(
                ec2.InstanceInitiatedShutdownBehavior.TERMINATE
                if instance.auto_shutdown
                else ec2.InstanceInitiatedShutdownBehavior.STOP
            ),
            detailed_monitoring=True,
            ebs_optimized=True,
            spot_options=(
                ec2.LaunchTemplateSpotOptions(
                    request_type=ec2.SpotRequestType.ONE_TIME,
                    interruption_behavior=ec2.SpotInstanceInterruption.TERMINATE,
                    max_price=float(instance.spot_max_price) if instance.spot_max_price else None,
                )
                if instance.use_spot
                else None
            ),
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/sda1",
                    volume=ec2.BlockDeviceVolume.ebs(
                        instance.volume_size_gb,
                        encrypted=True,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        delete_on_termination=True,
                    ),
                )
            ],
        )

    def _instance(
        self, props: ComputeProps, *, run_id: str, tags: dict[str, str], alerts_topic: sns.ITopic
    ) -> ec2.CfnInstance:
        """The seed's instance, frozen at its run's start so no later deploy replaces or stops it.

        Everything it is made of (AMI, type, user data, market, tags) lives in version 1 of its run's
        own launch template. Later deploys may add versions to that template (a newer AMI, other
        settings); the instance keeps naming version 1, so its resource never changes while the run
        id stays. A new run id is a new template and a new logical id: a new instance
        (docs/architecture.md, "A redeploy never replaces a running instance").
        """
        self.run_launch_template = self._launch_template(
            f"RunLaunchTemplate-{run_id}",
            props.instance,
            user_data=with_run_overrides(self.user_data_script, {"TI_RUN_ID": run_id}),
        )
        for key, value in {**tags, "Name": naming.instance_name(run_id)}.items():
            Tags.of(self.run_launch_template).add(key, value)
        instance = ec2.CfnInstance(
            self,
            # The run id as is: ids made from it must differ whenever run ids differ (ab-1 vs ab1).
            f"Instance-{run_id}",
            launch_template=ec2.CfnInstance.LaunchTemplateSpecificationProperty(
                launch_template_id=self.run_launch_template.launch_template_id,
                version=FROZEN_TEMPLATE_VERSION,
            ),
            # Also in the template; said here too because cdk-nag (EC28) reads only the instance. A constant.
            monitoring=True,
            subnet_id=self.subnet_ids[0],
        )
        acknowledge_nag(
            instance, "EC29", "Spot instances cannot have termination protection; instances end themselves by design"
        )
        self.alarms = self._instance_alarms(props.run, instance=instance, alerts_topic=alerts_topic)
        return instance

    def _instance_alarms(
        self, run: RunDefaults, *, instance: ec2.CfnInstance, alerts_topic: sns.ITopic
    ) -> tuple[cloudwatch.Alarm, ...]:
        terminate = cw_actions.Ec2Action(cw_actions.Ec2InstanceAction.TERMINATE)
        notify = cw_actions.SnsAction(alerts_topic)
        period = Duration.minutes(5)
        gpu_idle = cloudwatch.Alarm(
            self,
            "GpuIdleAlarm",
            alarm_description=(
                f"GPU below {run.idle_gpu_percent:g}% for {run.idle_minutes} min on {instance.ref}: "
                "the run is idle or hung, terminating (the agent normally ends it first)"
            ),
            metric=cloudwatch.Metric(
                namespace=naming.METRIC_NAMESPACE,
                metric_name="GPUUtilization",
                dimensions_map={"InstanceId": instance.ref},
                statistic="Maximum",
                period=period,
            ),
            threshold=run.idle_gpu_percent,
            comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            evaluation_periods=max(1, math.ceil(run.idle_minutes / 5)),
            # Booting and pulling the image publish nothing yet: silence is not idleness.
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        status_check = cloudwatch.Alarm(
            self,
            "StatusCheckAlarm",
            alarm_description=f"{instance.ref} failed its EC2 status checks: terminating so it stops billing",
            metric=cloudwatch.Metric(
                namespace="AWS/EC2",
                metric_name="StatusCheckFailed",
                dimensions_map={"InstanceId": instance.ref},
                statistic="Maximum",
                period=Duration.minutes(1),
            ),
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            evaluation_periods=3,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        for alarm in (gpu_idle, status_check):
            alarm.add_alarm_action(terminate, notify)
        return gpu_idle, status_check
