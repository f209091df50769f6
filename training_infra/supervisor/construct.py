"""Managed runs: the run table (state that outlives compute) and the supervisor that keeps runs going.

`RunTable` lives in the storage stack, retained like the buckets: the history of every run and
attempt survives a `make destroy` of compute. `TrainingSupervisor` lives in the compute stack,
next to the instance role it passes and the instances it launches (docs/architecture.md, "Managed
runs"). Its runtime, in `runtime/`, is also what `training-infra launch` imports for the first launch.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from aws_cdk import Duration, Fn, RemovalPolicy, Stack
from aws_cdk import aws_budgets as budgets
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from constructs import Construct

from training_infra import naming
from training_infra.monitored_function import PYTHON_RUNTIME, MonitoredFunction, MonitoredFunctionProps
from training_infra.policy import acknowledge_nag, as_seen_from, nag_name, skip_checkov
from training_infra.supervisor.layer import layer_zip
from training_infra.supervisor.runtime.records import ACTIVE_INDEX, CREATED_INDEX

RUNTIME_DIR = pathlib.Path(__file__).parent / "runtime"
RECONCILE_MINUTES = 1
# Sweeps import Optuna and numpy inside the supervisor (runtime/sweeps.py): 1 GB buys the CPU share that keeps a
# cold import of them to seconds (Lambda's CPU grows with memory); runs without a sweep never import them.
SUPERVISOR_MEMORY_MB = 1024
# Instance states after which an attempt is over or must be looked at; pending adds nothing.
WATCHED_STATES = ("running", "stopping", "stopped", "shutting-down", "terminated")
# Session Manager names a session after its caller: AWS's end-user policy lets each end only its own.
SESSIONS_OF_CALLER = "${aws:userid}-*"


class RunTable(Construct):
    """One item per run (spec, deadline, state, attempts), on-demand billing: $0 with no runs.

    Indexes: `Active` (sparse: only unfinished runs, what the reconcile reads) and `ByCreated`
    (every run by creation time, what `status` lists newest first).
    """

    def __init__(self, scope: Construct, construct_id: str, *, retain: bool = True) -> None:
        super().__init__(scope, construct_id)
        self.table = dynamodb.Table(
            self,
            "Table",
            partition_key=dynamodb.Attribute(name="run_id", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            deletion_protection=retain,
            removal_policy=RemovalPolicy.RETAIN if retain else RemovalPolicy.DESTROY,
        )
        self.table.add_global_secondary_index(
            index_name=ACTIVE_INDEX, partition_key=dynamodb.Attribute(name="active", type=dynamodb.AttributeType.STRING)
        )
        self.table.add_global_secondary_index(
            index_name=CREATED_INDEX,
            partition_key=dynamodb.Attribute(name="kind", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="created_at", type=dynamodb.AttributeType.STRING),
        )
        skip_checkov(
            self.table,
            "CKV_AWS_119",
            "Encrypted at rest with the AWS managed DynamoDB key; run records hold run ids, instance types and "
            "times, no secrets, and a customer managed key would add $1/month and a key policy to review.",
        )

    def grant_records(self, grantee: iam.IGrantable) -> iam.Grant:
        """Read, conditionally put and query run records (the table and its two indexes), nothing else; BatchGetItem
        reads a sweep's study journal (runtime/journal.py), 100 entries a call.

        The index wildcard is acknowledged here, on the grantee, named as cdk-nag names it.
        """
        principal = grantee.grant_principal
        consumer = principal if isinstance(principal, Construct) else self
        table_arn = as_seen_from(consumer, self.table, self.table.table_arn)
        grant = iam.Grant.add_to_principal(
            grantee=grantee,
            actions=["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:PutItem", "dynamodb:Query"],
            resource_arns=[table_arn],
        ).combine(
            iam.Grant.add_to_principal(
                grantee=grantee, actions=["dynamodb:Query"], resource_arns=[f"{table_arn}/index/*"]
            )
        )
        if isinstance(principal, Construct):
            acknowledge_nag(
                principal,
                f"IAM5[Resource::{nag_name(principal, f'{table_arn}/index/*')}]",
                "Query on the run table's own two indexes (Active, ByCreated); no other table.",
            )
        return grant


@dataclass(frozen=True)
class SupervisorProps:
    log_retention_days: int = 30
    reserve_lambda_concurrency: bool = True
    monthly_limit_usd: float = 0  # 0: none
    # The stack's limits every request and every record is checked against (docs/architecture.md, "Trust boundaries").
    allowed_instance_types: tuple[str, ...] = ("g5.*",)
    max_runtime_hours: float = 12
    max_nodes: int = 8
    gang_replace_timeout_minutes: int = 10


@dataclass(frozen=True)
class LaunchTarget:
    """What every run is launched from and into: the stack template, its network and its instance profile."""

    launch_template: ec2.LaunchTemplate
    vpc_id: str  # the stack's VPC: where a gang's security group may be made
    subnet_ids: list[str]
    security_group: ec2.ISecurityGroup
    instance_profile: iam.IInstanceProfile
    instance_role: iam.IRole
    image_id: str = ""  # the AMI the stack template names (a token on AWS): its default version must keep it


class TrainingSupervisor(Construct):
    """The supervisor Lambda, the EventBridge rules and one-minute schedule that invoke it, and its least privilege."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        props: SupervisorProps,
        run_table: dynamodb.ITable,
        outputs_bucket: s3.IBucket,
        target: LaunchTarget,
        alerts_topic: sns.ITopic,
        alerts_key: kms.IKey,
        monthly_budget_name: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.target, self.props = target, props
        # Optuna and what `import optuna` loads, from pinned wheels (layer.py): built once per pin set, no Docker.
        self.optuna_layer = lambda_.LayerVersion(
            self,
            "OptunaLayer",
            code=lambda_.Code.from_asset(str(layer_zip())),
            compatible_runtimes=[PYTHON_RUNTIME],
            compatible_architectures=[lambda_.Architecture.ARM_64],
            description="Optuna for sweeps (requirements-lambda.txt)",
        )
        environment = {
            "TABLE": run_table.table_name,
            "OUTPUTS_BUCKET": outputs_bucket.bucket_name,
            "MANAGED_TAG": naming.TAG_MANAGED,
            "RUN_ID_TAG": naming.TAG_RUN_ID,
            "ATTEMPT_TAG": naming.TAG_ATTEMPT,
            "DEADLINE_TAG": naming.TAG_DEADLINE,
            "MAX_RUNTIME_TAG": naming.TAG_MAX_RUNTIME_HOURS,
            "STOP_TAG": naming.TAG_STOP,
            "RUNS_PREFIX": naming.RUNS_PREFIX,
            "METRIC_NAMESPACE": naming.METRIC_NAMESPACE,
            "MONTHLY_LIMIT_USD": f"{props.monthly_limit_usd:g}",
            # The stack's limits: what a request or a record is checked against.
            "LAUNCH_TEMPLATE_ID": target.launch_template.launch_template_id or "",
            "SUBNET_IDS": Fn.join(",", target.subnet_ids),
            "SECURITY_GROUP_ID": target.security_group.security_group_id,
            "INSTANCE_PROFILE_ARN": target.instance_profile.instance_profile_arn,
            "ALLOWED_INSTANCE_TYPES": ",".join(props.allowed_instance_types),
            "MAX_RUNTIME_HOURS": f"{props.max_runtime_hours:g}",
            "RUN_TEMPLATE_PREFIX": naming.RUN_TEMPLATE_PREFIX,
            "CREATED_BY_TAG": naming.TAG_CREATED_BY,
            "IMAGE_ID": target.image_id,
            # Gangs (gang.py).
            "NODE_TAG": naming.TAG_NODE,
            "NODES_TAG": naming.TAG_NODES,
            "RENDEZVOUS_TAG": naming.TAG_RENDEZVOUS,
            "MAX_NODES": str(props.max_nodes),
            "GANG_REPLACE_SECONDS": str(props.gang_replace_timeout_minutes * 60),
        }
        self.function = MonitoredFunction(
            self,
            "Function",
            props=MonitoredFunctionProps(
                name="supervisor",
                code_dir=RUNTIME_DIR,
                handler="supervisor.handler",
                description="Starts, keeps going and stops managed training runs: the only writer of runs and their "
                "launch templates",
                failure_meaning="Some runs were not relaunched or ended this minute; the next reconcile retries.",
                timeout=Duration.seconds(50),  # inside the one-minute schedule
                log_retention_days=props.log_retention_days,
                reserved_concurrency=2 if props.reserve_lambda_concurrency else None,
                retry_attempts=2,
                alarm_period=Duration.minutes(5),
                environment=environment,
                memory_mb=SUPERVISOR_MEMORY_MB,
                layers=(self.optuna_layer,),
            ),
            alerts_topic=alerts_topic,
            alerts_key=alerts_key,
        )
        # Users' launch, resume and stop: a function of its own, the only one they may invoke, so nobody but
        # EventBridge hands the supervisor an event (docs/architecture.md, "Trust boundaries").
        self.requests = MonitoredFunction(
            self,
            "Requests",
            props=MonitoredFunctionProps(
                name="supervisor requests",
                code_dir=RUNTIME_DIR,
                handler="run_requests.handler",
                description="Launch, resume and stop requests of training-infra users, checked against the stack's "
                "limits: the only way a user starts or ends a run",
                failure_meaning="A user's launch or stop failed inside the supervisor; the user saw the error.",
                timeout=Duration.seconds(50),
                log_retention_days=props.log_retention_days,
                reserved_concurrency=2 if props.reserve_lambda_concurrency else None,
                retry_attempts=0,
                alarm_period=Duration.minutes(5),
                environment=environment,
                memory_mb=SUPERVISOR_MEMORY_MB,
                layers=(self.optuna_layer,),
            ),
            alerts_topic=alerts_topic,
            alerts_key=alerts_key,
        )
        # A run template's CreatedBy must be one of these roles (run_requests.run_template_problem): names and tags
        # can be copied by anyone who may create and tag templates, the creator cannot.
        creators = Fn.join(",", [self.function.role.role_name, self.requests.role.role_name])
        for function in (self.function, self.requests):
            function.function.add_environment("TEMPLATE_CREATORS", creators)
            self._grant_launching(function)
        self._rules()
        if monthly_budget_name:
            self._stop_launching_past(monthly_budget_name, alerts_topic)

    def _grant_launching(self, fn: MonitoredFunction) -> None:
        """Runs only from templates it made itself (created-by tag), only the project's instance profile, types and
        network, only tagged instances; it ends only managed instances with that profile and deletes only its own
        templates. Condition keys per resource type as the Service Authorization Reference lists them for
        ec2:RunInstances and ec2:CreateFleet (parliament's copy of it is what tests/test_gates.py checks against)."""
        stack = Stack.of(self)
        target = self.target

        def arn(resource: str, name: str = "*") -> str:
            return stack.format_arn(service="ec2", resource=resource, resource_name=name)

        launch = ["ec2:CreateFleet", "ec2:RunInstances"]
        made_by_us = {f"aws:ResourceTag/{naming.TAG_CREATED_BY}": "supervisor"}
        profile = target.instance_profile.instance_profile_arn
        statements = [
            iam.PolicyStatement(sid="CreateInstantFleets", actions=["ec2:CreateFleet"], resources=[arn("fleet")]),
            iam.PolicyStatement(
                sid="LaunchOnlyFromTemplatesItMade",
                actions=launch,
                resources=[arn("launch-template")],
                conditions={"StringEquals": made_by_us},
            ),
            iam.PolicyStatement(
                sid="LaunchOnlyProjectInstances",
                actions=launch,
                resources=[arn("instance")],
                conditions={
                    "StringEquals": {f"aws:RequestTag/{naming.TAG_MANAGED}": "true"},
                    "ArnEquals": {"ec2:InstanceProfile": profile},
                    "StringLike": {"ec2:InstanceType": list(self.props.allowed_instance_types)},
                },
            ),
            iam.PolicyStatement(
                sid="LaunchOnlyIntoTheStacksNetwork",
                actions=launch,
                resources=[arn("subnet", subnet) for subnet in target.subnet_ids],
            ),
            iam.PolicyStatement(
                sid="LaunchOnlyWithTheStacksSecurityGroup",
                actions=["ec2:RunInstances"],
                resources=[arn("security-group", target.security_group.security_group_id)],
            ),
            iam.PolicyStatement(
                sid="InterfacesOnlyInTheStacksSubnets",
                actions=["ec2:RunInstances"],
                resources=[arn("network-interface")],
                conditions={"ArnEquals": {"ec2:Subnet": [arn("subnet", subnet) for subnet in target.subnet_ids]}},
            ),
            iam.PolicyStatement(
                sid="ImageOnlyFromTheTemplate",
                actions=["ec2:RunInstances"],
                resources=[f"arn:{stack.partition}:ec2:{stack.region}::image/*"],
                conditions={"Bool": {"ec2:IsLaunchTemplateResource": "true"}},
            ),
            iam.PolicyStatement(
                # A run in a Capacity Block the user bought (blocks.py): only the reservation its own template names
                # (ec2:IsLaunchTemplateResource), only one tagged training-infra:managed=true (`capacity buy` tags
                # it: no other block of the account), only in this account and region. CreateFleet lists no
                # capacity-reservation resource: EC2 authorizes a fleet's launch into one as ec2:RunInstances.
                sid="LaunchIntoReservationsOfItsTemplates",
                actions=["ec2:RunInstances"],
                resources=[arn("capacity-reservation")],
                conditions={
                    "Bool": {"ec2:IsLaunchTemplateResource": "true"},
                    "StringEquals": {f"aws:ResourceTag/{naming.TAG_MANAGED}": "true"},
                },
            ),
            iam.PolicyStatement(
                sid="VolumesWithTheInstance",
                actions=launch,
                resources=[arn("volume")],  # the root volume comes with the instance (tagged by the run template)
            ),
            iam.PolicyStatement(
                sid="FleetImageOfItsTemplate",
                # CreateFleet's image has no ec2:IsLaunchTemplateResource key, but EC2 evaluates ec2:ImageID on it
                # (Service Authorization Reference): only the AMI the deploy put in the stack template.
                actions=["ec2:CreateFleet"],
                resources=[f"arn:{stack.partition}:ec2:{stack.region}::image/*"],
                conditions={"StringEquals": {"ec2:ImageID": target.image_id}} if target.image_id else None,
            ),
            iam.PolicyStatement(
                sid="TagAtLaunch",
                actions=["ec2:CreateTags"],
                resources=[
                    arn("instance"),
                    arn("volume"),
                    arn("launch-template"),
                    arn("placement-group"),
                    arn("security-group"),
                ],  # fmt: skip
                conditions={
                    "StringEquals": {
                        "ec2:CreateAction": [
                            "CreateFleet",
                            "RunInstances",
                            "CreateLaunchTemplate",
                            "CreatePlacementGroup",
                            "CreateSecurityGroup",
                        ]  # fmt: skip
                    }
                },
            ),
            # Gangs (gang.py): a cluster placement group per attempt, made, launched into and deleted only with the
            # created-by tag only this function sets; the EFA version of a run template it made.
            iam.PolicyStatement(
                sid="MakeClusterPlacementGroupsTagged",
                actions=["ec2:CreatePlacementGroup"],
                resources=[arn("placement-group")],
                conditions={
                    "StringEquals": {
                        f"aws:RequestTag/{naming.TAG_CREATED_BY}": "supervisor",
                        "ec2:PlacementGroupStrategy": "cluster",
                    }
                },
            ),
            iam.PolicyStatement(
                sid="LaunchOnlyIntoPlacementGroupsItMade",
                actions=launch,
                resources=[arn("placement-group")],
                conditions={"StringEquals": made_by_us},
            ),
            iam.PolicyStatement(
                sid="DeleteOnlyPlacementGroupsItMade",
                actions=["ec2:DeletePlacementGroup"],
                resources=[arn("placement-group")],
                conditions={"StringEquals": made_by_us},
            ),
            # Gangs: a security group per attempt (its members reach each other, nothing else does), made only in
            # the stack's VPC with the created-by tag; its rules changed, launched into and deleted only with it.
            iam.PolicyStatement(
                sid="MakeGangSecurityGroupsInTheStacksVpc",
                actions=["ec2:CreateSecurityGroup"],
                resources=[arn("vpc", target.vpc_id)],
            ),
            iam.PolicyStatement(
                sid="MakeGangSecurityGroupsTagged",
                actions=["ec2:CreateSecurityGroup"],
                resources=[arn("security-group")],
                conditions={"StringEquals": {f"aws:RequestTag/{naming.TAG_CREATED_BY}": "supervisor"}},
            ),
            iam.PolicyStatement(
                sid="RulesAndDeleteOnlyOfGangGroupsItMade",
                actions=[
                    "ec2:AuthorizeSecurityGroupIngress",
                    "ec2:AuthorizeSecurityGroupEgress",
                    "ec2:RevokeSecurityGroupIngress",
                    "ec2:RevokeSecurityGroupEgress",
                    "ec2:DeleteSecurityGroup",
                ],
                resources=[arn("security-group")],
                conditions={"StringEquals": made_by_us, "ArnEquals": {"ec2:Vpc": arn("vpc", target.vpc_id)}},
            ),
            iam.PolicyStatement(
                sid="LaunchOnlyIntoGangGroupsItMade",
                actions=["ec2:RunInstances"],
                resources=[arn("security-group")],
                conditions={"StringEquals": made_by_us},
            ),
            iam.PolicyStatement(
                sid="EfaVersionOfTemplatesItMade",
                actions=["ec2:CreateLaunchTemplateVersion"],
                resources=[arn("launch-template")],
                conditions={"StringEquals": made_by_us},
            ),
            iam.PolicyStatement(
                sid="MakeRunTemplatesTagged",
                actions=["ec2:CreateLaunchTemplate"],
                resources=[arn("launch-template")],
                conditions={"StringEquals": {f"aws:RequestTag/{naming.TAG_CREATED_BY}": "supervisor"}},
            ),
            iam.PolicyStatement(
                sid="StopAndEndOnlyProjectInstances",
                actions=["ec2:CreateTags", "ec2:TerminateInstances"],
                resources=[arn("instance")],
                conditions={
                    "StringEquals": {f"aws:ResourceTag/{naming.TAG_MANAGED}": "true"},
                    "ArnEquals": {"ec2:InstanceProfile": profile},
                },
            ),
            iam.PolicyStatement(
                sid="DeleteOnlyTemplatesItMade",
                actions=["ec2:DeleteLaunchTemplate"],
                resources=[arn("launch-template")],
                conditions={"StringEquals": made_by_us},
            ),
            iam.PolicyStatement(
                sid="ReadInstancesTemplatesAndSubnets",
                actions=[
                    "ec2:DescribeInstances",
                    "ec2:DescribeSubnets",
                    "ec2:DescribeInstanceStatus",
                    "ec2:DescribeLaunchTemplates",
                    "ec2:DescribeLaunchTemplateVersions",
                    # Pricing an attempt when it ends (ledger.py).
                    "ec2:DescribeSpotPriceHistory",
                    # Gangs: which types take an EFA interface, and the run's placement groups to delete.
                    "ec2:DescribeInstanceTypes",
                    "ec2:DescribePlacementGroups",
                    # Gangs: the stack's VPC (its instance group's) and the gang groups to sweep.
                    "ec2:DescribeSecurityGroups",
                    # Zones ranked for a spot launch (capacity.py).
                    "ec2:GetSpotPlacementScores",
                    # A launch into a Capacity Block: its type, zone, state and end checked (blocks.py).
                    "ec2:DescribeCapacityReservations",
                ],
                resources=["*"],  # Describe* and GetSpotPlacementScores have no resource-level permissions
            ),
            iam.PolicyStatement(
                sid="ReadListPrices",  # a run's price cap: on-demand list prices (spot prices: the statement above)
                actions=["pricing:GetProducts"],
                resources=["*"],  # the Price List API has no resource-level permissions
            ),
            iam.PolicyStatement(
                sid="ReadTheAgentsGpuMetric",
                actions=["cloudwatch:GetMetricStatistics"],
                resources=["*"],  # CloudWatch metrics have no resource-level permissions
            ),
            iam.PolicyStatement(
                sid="PassOnlyTheInstanceRole",
                actions=["iam:PassRole"],
                resources=[target.instance_role.role_arn],
                conditions={"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
            ),
            iam.PolicyStatement(
                sid="FleetServiceLinkedRole",
                actions=["iam:CreateServiceLinkedRole"],
                resources=[
                    f"arn:{stack.partition}:iam::{stack.account}:role/aws-service-role/ec2fleet.amazonaws.com/*"
                ],
                conditions={"StringEquals": {"iam:AWSServiceName": "ec2fleet.amazonaws.com"}},
            ),
        ]
        for statement in statements:
            fn.add_to_role_policy(statement)
        for resource, why in (
            ("fleet", "fleet ids are made by the request itself"),
            ("launch-template", "run templates are made at run time; launching, tagging and deleting need the "
             "created-by=supervisor tag only this function may set (CreateLaunchTemplate's aws:RequestTag)"),
            ("instance", "instances are made at launch; launching needs the managed tag, the project's instance "
             "profile and an allowed type, ending needs the managed tag and the profile"),
            ("volume", "the root volume is made with the instance and tagged by the run template"),
            ("network-interface", "the interface is made with the instance, only in the stack's subnets (ec2:Subnet)"),
            ("placement-group", "a gang's cluster placement group is made per attempt at run time; making it needs the "
             "created-by=supervisor tag and the cluster strategy, launching into and deleting it need that tag"),
            ("security-group", "a gang's security group is made per attempt at run time; making it needs the "
             "created-by=supervisor tag (and the stack's VPC), changing its rules, launching into and deleting it "
             "need that tag"),
            ("capacity-reservation", "the user buys a Capacity Block at run time and names it at launch; only the "
             "reservation a run template this function made targets (ec2:IsLaunchTemplateResource), only in this "
             "account and region, after the request function checked its type, zone, state and end"),
        ):  # fmt: skip
            fn.acknowledge(f"IAM5[Resource::{nag_name(fn.role, arn(resource))}]", why)
        fn.acknowledge(
            f"IAM5[Resource::{nag_name(fn.role, f'arn:{stack.partition}:ec2:{stack.region}::image/*')}]",
            "The AMI id resolves from an SSM parameter at deploy; RunInstances takes it only from the launch "
            "template (ec2:IsLaunchTemplateResource), and only templates this function made (from the stack "
            "template's default version) can be launched.",
        )
        fleet_role = f"arn:{stack.partition}:iam::{stack.account}:role/aws-service-role/ec2fleet.amazonaws.com/*"
        fn.acknowledge(
            f"IAM5[Resource::{nag_name(fn.role, fleet_role)}]",
            "Only EC2 Fleet's own service-linked role, created once per account on the first fleet.",
        )
        fn.acknowledge(
            "IAM5[Resource::*]",
            "ec2:DescribeInstances, DescribeSubnets, DescribeInstanceStatus, DescribeLaunchTemplates, "
            "DescribeLaunchTemplateVersions, DescribeSpotPriceHistory, DescribeInstanceTypes, DescribePlacementGroups, "
            "DescribeSecurityGroups, DescribeCapacityReservations, GetSpotPlacementScores, pricing:GetProducts and "
            "cloudwatch:GetMetricStatistics support no resource-level permissions; they only read.",
        )

    def _stop_launching_past(self, budget_name: str, alerts_topic: sns.ITopic) -> None:
        """AWS Budgets as the backstop of the run ledger: past 100 % of the monthly budget (actual
        spend), Budgets attaches a policy denying new instances to this function's role, so even a
        bug in our own ledger cannot launch without end. Detach it (after raising the budget) to
        launch again; the reaper and stop keep working meanwhile."""
        stack = Stack.of(self)
        roles = [self.function.role, self.requests.role]
        self.deny_launches = iam.ManagedPolicy(
            self,
            "DenyLaunchesPastBudget",
            description="Attached by AWS Budgets when the monthly budget is passed: no new training instances",
            statements=[
                iam.PolicyStatement(
                    effect=iam.Effect.DENY,
                    actions=["ec2:RunInstances", "ec2:CreateFleet"],
                    resources=["*"],
                )
            ],
        )
        executor = iam.Role(
            self,
            "BudgetActionRole",
            description="AWS Budgets attaches the deny-launches policy to the supervisor's role with this",
            assumed_by=iam.ServicePrincipal(
                "budgets.amazonaws.com", conditions={"StringEquals": {"aws:SourceAccount": stack.account}}
            ),
        )
        executor.add_to_policy(
            iam.PolicyStatement(
                sid="AttachOnlyTheDenyPolicyToTheSupervisor",
                actions=["iam:AttachRolePolicy", "iam:DetachRolePolicy"],
                resources=[role.role_arn for role in roles],
                conditions={"ArnEquals": {"iam:PolicyARN": self.deny_launches.managed_policy_arn}},
            )
        )
        budgets.CfnBudgetsAction(
            self,
            "StopLaunchingPastBudget",
            budget_name=budget_name,
            action_type="APPLY_IAM_POLICY",
            notification_type="ACTUAL",
            approval_model="AUTOMATIC",
            action_threshold=budgets.CfnBudgetsAction.ActionThresholdProperty(type="PERCENTAGE", value=100),
            execution_role_arn=executor.role_arn,
            definition=budgets.CfnBudgetsAction.DefinitionProperty(
                iam_action_definition=budgets.CfnBudgetsAction.IamActionDefinitionProperty(
                    policy_arn=self.deny_launches.managed_policy_arn, roles=[role.role_name for role in roles]
                )
            ),
            subscribers=[budgets.CfnBudgetsAction.SubscriberProperty(type="SNS", address=alerts_topic.topic_arn)],
        )

    def _rules(self) -> None:
        target = targets.LambdaFunction(self.function.function, retry_attempts=2)
        events.Rule(
            self,
            "InstanceStateEvents",
            description="Instance state changes that may end an attempt (the supervisor keeps only managed runs')",
            event_pattern=events.EventPattern(
                source=["aws.ec2"],
                detail_type=["EC2 Instance State-change Notification"],
                detail={"state": list(WATCHED_STATES)},
            ),
            targets=[target],
        )
        events.Rule(
            self,
            "SpotWarningEvents",
            description="Spot interruption warnings and rebalance recommendations: an attempt AWS is about to reclaim",
            event_pattern=events.EventPattern(
                source=["aws.ec2"],
                detail_type=["EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation"],
            ),
            targets=[target],
        )
        events.Rule(
            self,
            "CapacityBlockEndingEvents",
            description="A Capacity Block ends in 40 minutes: its runs checkpoint and stop before EC2 ends them",
            event_pattern=events.EventPattern(
                # Both names the EC2 User Guide gives it (runtime/capacity.py BLOCK_EXPIRING; a test holds them equal).
                source=["aws.ec2"],
                detail_type=["Capacity Block Expiration Warning", "Capacity Block Reservation Expiration Warning"],
            ),
            targets=[target],
        )
        events.Rule(
            self,
            "Reconcile",
            description="Catches what events miss (AWS delivers them best effort): every active run, every minute",
            schedule=events.Schedule.rate(Duration.minutes(RECONCILE_MINUTES)),
            targets=[targets.LambdaFunction(self.function.function, retry_attempts=0)],
        )


def training_user_policy(
    scope: Construct,
    construct_id: str,
    *,
    supervisor: TrainingSupervisor,
    run_table: dynamodb.ITable,
    data_bucket: s3.IBucket,
    outputs_bucket: s3.IBucket,
    repository: ecr.IRepository,
    log_group: logs.ILogGroup,
) -> iam.ManagedPolicy:
    """What a `training-infra` user needs and nothing more (docs/cli.md, "Permissions the command needs"):
    invoke the supervisor, read the stacks, the run table, the logs and the outputs, upload data, shell into a
    run's instance. No PutItem, CreateLaunchTemplate, CreateFleet, RunInstances or PassRole: launch, resume and
    stop are requests the supervisor checks (docs/architecture.md, "Trust boundaries")."""
    stack = Stack.of(scope)
    table_arn = as_seen_from(scope, run_table, run_table.table_arn)
    stacks = stack.format_arn(service="cloudformation", resource="stack", resource_name=f"{naming.STACK_PREFIX}-*/*")
    data, outputs = (as_seen_from(scope, b, b.bucket_arn) for b in (data_bucket, outputs_bucket))
    own_sessions = stack.format_arn(service="ssm", resource="session", resource_name=SESSIONS_OF_CALLER)
    statements = [
        iam.PolicyStatement(
            sid="AskTheSupervisor",
            actions=["lambda:InvokeFunction"],
            resources=[supervisor.requests.function.function_arn],
        ),
        iam.PolicyStatement(sid="ReadTheStacks", actions=["cloudformation:DescribeStacks"], resources=[stacks]),
        iam.PolicyStatement(
            sid="ReadRunRecords",
            actions=["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"],
            resources=[table_arn, f"{table_arn}/index/*"],
        ),
        iam.PolicyStatement(sid="ListBuckets", actions=["s3:ListBucket"], resources=[data, outputs]),
        iam.PolicyStatement(
            sid="UploadData",
            actions=["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
            resources=[f"{data}/{naming.DATA_PREFIX}*"],
        ),
        iam.PolicyStatement(sid="FetchRuns", actions=["s3:GetObject"], resources=[f"{outputs}/{naming.RUNS_PREFIX}*"]),
        iam.PolicyStatement(
            sid="ReadRunLogs",
            actions=["logs:GetLogEvents", "logs:DescribeLogStreams"],
            resources=[as_seen_from(scope, log_group, log_group.log_group_arn)],
        ),
        iam.PolicyStatement(
            sid="PreflightImage", actions=["ecr:DescribeImages"], resources=[repository.repository_arn]
        ),
        iam.PolicyStatement(
            sid="ReadEc2AndPrices",
            actions=[
                "ec2:DescribeInstances",
                "ec2:DescribeLaunchTemplateVersions",
                "ec2:DescribeSubnets",
                "ec2:DescribeSecurityGroups",
                "ec2:DescribeInstanceTypeOfferings",
                "ec2:DescribeInstanceTypes",
                "ec2:DescribeSpotPriceHistory",
                "ec2:GetSpotPlacementScores",  # the preflight's zone scores (supervisor/runtime/capacity.py)
                "ec2:DescribeCapacityBlockOfferings",  # `capacity offers` (buying stays an admin's: not granted)
                "ec2:DescribeCapacityReservations",  # launch --capacity-reservation: the preflight reads the block
                "servicequotas:GetServiceQuota",
                "pricing:GetProducts",
            ],
            resources=["*"],  # none of these has resource-level permissions
        ),
        iam.PolicyStatement(
            sid="ShellIntoRunInstances",
            actions=["ssm:StartSession"],
            resources=[stack.format_arn(service="ec2", resource="instance", resource_name="*")],
            conditions={"StringEquals": {f"aws:ResourceTag/{naming.TAG_MANAGED}": "true"}},
        ),
        iam.PolicyStatement(
            sid="ShellDocument",
            actions=["ssm:StartSession"],
            # Session Manager's shell document lives in the account (its preferences); an ARN without the
            # account matched nothing, so StartSession was allowed only while AWS does not check the document.
            resources=[
                stack.format_arn(service="ssm", resource="document", resource_name="SSM-SessionManagerRunShell")
            ],
        ),
        iam.PolicyStatement(
            sid="EndOwnSessions",
            actions=["ssm:TerminateSession", "ssm:ResumeSession"],
            resources=[own_sessions],
        ),
    ]
    policy = iam.ManagedPolicy(
        scope,
        construct_id,
        description="training-infra CLI users: ask the supervisor to launch or stop, read runs, logs and outputs, "
        "upload data, shell into a run; never write runs, templates or instances",
        statements=statements,
    )
    for finding, reason in (
        ("IAM5[Resource::*]", "EC2 Describe*, servicequotas:GetServiceQuota and pricing:GetProducts have no "
         "resource-level permissions; they only read."),
        (f"IAM5[Resource::{nag_name(policy, stacks)}]", "DescribeStacks on this project's four stacks only."),
        (f"IAM5[Resource::{nag_name(policy, f'{table_arn}/index/*')}]", "Query on the run table's own two indexes."),
        (f"IAM5[Resource::{nag_name(policy, f'{data}/{naming.DATA_PREFIX}*')}]", "Upload only under data/."),
        (f"IAM5[Resource::{nag_name(policy, f'{outputs}/{naming.RUNS_PREFIX}*')}]", "Fetch only runs/."),
        (f"IAM5[Resource::{nag_name(policy, stack.format_arn(service='ec2', resource='instance', resource_name='*'))}]",
         "Session Manager only to instances tagged training-infra:managed=true (aws:ResourceTag)."),
        (f"IAM5[Resource::{nag_name(policy, own_sessions)}]",
         "Ending or resuming only the caller's own sessions: Session Manager names each <caller user id>-<id>."),
    ):  # fmt: skip
        acknowledge_nag(policy, finding, reason)
    return policy
