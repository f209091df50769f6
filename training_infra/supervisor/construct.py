"""Managed runs: the run table (state that outlives compute) and the supervisor that keeps runs going.

`RunTable` lives in the storage stack, retained like the buckets: the history of every run and
attempt survives a `make destroy` of compute. `TrainingSupervisor` lives in the compute stack,
next to the instance role it passes and the instances it launches (docs/architecture.md, "Managed
runs"). Its runtime, in `runtime/`, is also what `training-infra launch` imports for the first launch.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_budgets as budgets
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from constructs import Construct

from training_infra import naming
from training_infra.monitored_function import MonitoredFunction, MonitoredFunctionProps
from training_infra.policy import acknowledge_nag, as_seen_from, nag_name, skip_checkov
from training_infra.supervisor.runtime.records import ACTIVE_INDEX, CREATED_INDEX

RUNTIME_DIR = pathlib.Path(__file__).parent / "runtime"
RECONCILE_MINUTES = 1
# Instance states after which an attempt is over or must be looked at; pending adds nothing.
WATCHED_STATES = ("running", "stopping", "stopped", "shutting-down", "terminated")


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
        """Read, conditionally put and query run records (the table and its two indexes), nothing else.

        The index wildcard is acknowledged here, on the grantee, named as cdk-nag names it.
        """
        principal = grantee.grant_principal
        consumer = principal if isinstance(principal, Construct) else self
        table_arn = as_seen_from(consumer, self.table, self.table.table_arn)
        grant = iam.Grant.add_to_principal(
            grantee=grantee,
            actions=["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query"],
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
        instance_role: iam.IRole,
        alerts_topic: sns.ITopic,
        alerts_key: kms.IKey,
        monthly_budget_name: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.function = MonitoredFunction(
            self,
            "Function",
            props=MonitoredFunctionProps(
                name="supervisor",
                code_dir=RUNTIME_DIR,
                handler="supervisor.handler",
                description="Keeps managed training runs going: relaunches reclaimed attempts, ends finished runs",
                failure_meaning="Some runs were not relaunched or ended this minute; the next reconcile retries.",
                timeout=Duration.seconds(50),  # inside the one-minute schedule
                log_retention_days=props.log_retention_days,
                reserved_concurrency=2 if props.reserve_lambda_concurrency else None,
                retry_attempts=2,
                alarm_period=Duration.minutes(5),
                environment={
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
                },
            ),
            alerts_topic=alerts_topic,
            alerts_key=alerts_key,
        )
        self._grant_launching(instance_role)
        self._rules()
        if monthly_budget_name:
            self._stop_launching_past(monthly_budget_name, alerts_topic)

    def _grant_launching(self, instance_role: iam.IRole) -> None:
        """Fleets only from the project's run templates, only tagged instances, only the instance role."""
        stack = Stack.of(self)
        fn = self.function

        def arn(resource: str) -> str:
            return stack.format_arn(service="ec2", resource=resource, resource_name="*")

        managed = {f"aws:ResourceTag/{naming.TAG_MANAGED}": "true"}
        statements = [
            iam.PolicyStatement(sid="CreateInstantFleets", actions=["ec2:CreateFleet"], resources=[arn("fleet")]),
            iam.PolicyStatement(
                sid="LaunchOnlyFromRunTemplates",
                actions=["ec2:CreateFleet", "ec2:RunInstances"],
                resources=[arn("launch-template")],
                conditions={"StringEquals": managed},
            ),
            iam.PolicyStatement(
                sid="LaunchOnlyTaggedInstances",
                actions=["ec2:RunInstances"],
                resources=[arn("instance")],
                conditions={"StringEquals": {f"aws:RequestTag/{naming.TAG_MANAGED}": "true"}},
            ),
            iam.PolicyStatement(
                sid="LaunchIntoTheNetwork",
                actions=["ec2:RunInstances"],
                # The root volume comes with the instance (tagged by the run template).
                resources=[
                    arn("volume"),
                    arn("subnet"),
                    arn("security-group"),
                    arn("network-interface"),
                    f"arn:{stack.partition}:ec2:{stack.region}::image/*",
                ],
            ),
            iam.PolicyStatement(
                sid="TagAtLaunch",
                actions=["ec2:CreateTags"],
                resources=[arn("instance"), arn("volume")],
                conditions={"StringEquals": {"ec2:CreateAction": ["CreateFleet", "RunInstances"]}},
            ),
            iam.PolicyStatement(
                sid="StopAndEndManagedInstances",
                actions=["ec2:CreateTags", "ec2:TerminateInstances"],
                resources=[arn("instance")],
                conditions={"StringEquals": managed},
            ),
            iam.PolicyStatement(
                sid="DeleteFinishedRunTemplates",
                actions=["ec2:DeleteLaunchTemplate"],
                resources=[arn("launch-template")],
                conditions={"StringEquals": managed},
            ),
            iam.PolicyStatement(
                sid="ReadInstancesAndSubnets",
                actions=[
                    "ec2:DescribeInstances",
                    "ec2:DescribeSubnets",
                    "ec2:DescribeInstanceStatus",
                    # Pricing an attempt when it ends (ledger.py).
                    "ec2:DescribeSpotPriceHistory",
                ],
                resources=["*"],  # Describe* has no resource-level permissions
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
                resources=[instance_role.role_arn],
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
        for resource in (
            "fleet",
            "launch-template",
            "instance",
            "volume",
            "subnet",
            "security-group",
            "network-interface",
        ):
            fn.acknowledge(
                f"IAM5[Resource::{nag_name(self, arn(resource))}]",
                f"{resource} ids are made at launch (fleets, run templates, instances) or are the user's network; "
                "each statement is limited by the training-infra:managed tag, the action or the passed role.",
            )
        fn.acknowledge(
            f"IAM5[Resource::{nag_name(self, f'arn:{stack.partition}:ec2:{stack.region}::image/*')}]",
            "The AMI comes from the run's launch template (the Deep Learning AMI of the day); "
            "RunInstances needs the image.",
        )
        fleet_role = f"arn:{stack.partition}:iam::{stack.account}:role/aws-service-role/ec2fleet.amazonaws.com/*"
        fn.acknowledge(
            f"IAM5[Resource::{nag_name(self, fleet_role)}]",
            "Only EC2 Fleet's own service-linked role, created once per account on the first fleet.",
        )
        fn.acknowledge(
            "IAM5[Resource::*]",
            "ec2:DescribeInstances, DescribeSubnets, DescribeInstanceStatus, DescribeSpotPriceHistory, "
            "pricing:GetProducts and cloudwatch:GetMetricStatistics support no resource-level permissions; "
            "they only read.",
        )

    def _stop_launching_past(self, budget_name: str, alerts_topic: sns.ITopic) -> None:
        """AWS Budgets as the backstop of the run ledger: past 100 % of the monthly budget (actual
        spend), Budgets attaches a policy denying new instances to this function's role, so even a
        bug in our own ledger cannot launch without end. Detach it (after raising the budget) to
        launch again; the reaper and stop keep working meanwhile."""
        stack = Stack.of(self)
        role = self.function.role
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
                resources=[role.role_arn],
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
                    policy_arn=self.deny_launches.managed_policy_arn, roles=[role.role_name]
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
            "Reconcile",
            description="Catches what events miss (AWS delivers them best effort): every active run, every minute",
            schedule=events.Schedule.rate(Duration.minutes(RECONCILE_MINUTES)),
            targets=[targets.LambdaFunction(self.function.function, retry_attempts=0)],
        )
