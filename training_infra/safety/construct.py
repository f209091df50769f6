"""The cloud-side guard rails: alert topic, budget, max-runtime reaper, instance notices, alarms.

Everything here is cheap at rest (one KMS key, a few alarms, a Lambda that runs for a fraction of
a second every five minutes) and works even when the training instance is hung.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import jsii
from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_budgets as budgets
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from training_infra import naming
from training_infra.monitored_function import SNS_TOPIC_CONTEXT, MonitoredFunction, MonitoredFunctionProps
from training_infra.policy import nag_name

RUNTIME_DIR = pathlib.Path(__file__).parent / "runtime"
REAPER_SCHEDULE_MINUTES = 5
# The on-box deadline fires a little after the tag's deadline (boot time) and then uploads logs;
# the reaper waits this long past the tag so it never cuts that upload short.
REAPER_GRACE_MINUTES = 10
MAX_RUNTIME_METRIC = "InstancesTerminatedForMaxRuntime"
# Services that publish to the alert topic: Budgets, EventBridge rules, CloudWatch alarms.
PUBLISHING_SERVICES = ("budgets.amazonaws.com", "events.amazonaws.com", "cloudwatch.amazonaws.com")
ACTUAL_THRESHOLDS = (50, 80, 100)
FORECASTED_THRESHOLDS = (100,)
# Instance states worth a notice; pending/stopping/shutting-down would only add noise.
NOTICE_STATES = ("running", "stopped", "terminated")


@jsii.implements(events.IRuleTarget)
class _TopicTarget:
    """An SNS target that leaves the topic policy alone (the construct writes a conditioned one).

    `targets.SnsTopic` would add an unconditioned `events.amazonaws.com` publish grant.
    """

    def __init__(self, topic: sns.ITopic, message: events.RuleTargetInput) -> None:
        self._topic = topic
        self._message = message

    def bind(self, _rule: events.IRule, _id: str | None = None) -> events.RuleTargetConfig:
        return events.RuleTargetConfig(arn=self._topic.topic_arn, input=self._message)


@dataclass(frozen=True)
class SafetyProps:
    """The settings the guard rails read (built from Settings in stacks.py)."""

    max_runtime_hours: float
    monthly_budget_usd: float
    log_retention_days: int
    alert_email: str = ""
    # Reserve Lambda concurrency; new accounts whose quota is still 10 cannot reserve any.
    reserve_lambda_concurrency: bool = True


class TrainingSafety(Construct):
    """Alert topic, monthly budget, max-runtime reaper, EC2 notices and their alarms."""

    def __init__(self, scope: Construct, construct_id: str, *, props: SafetyProps) -> None:
        super().__init__(scope, construct_id)
        self._props = props
        self.alerts_key = self._key()
        self.alerts_topic = self._topic()
        self.budget = self._budget()
        self.reaper = self._reaper()
        self.notifier = self._notifier()
        self._ec2_warning_rules()
        self.max_runtime_alarm = self._max_runtime_alarm()

    # --- alert topic -------------------------------------------------------------------------

    def _key(self) -> kms.Key:
        key = kms.Key(
            self,
            "AlertsKey",
            description="Encrypts the training-infra alert topic",
            enable_key_rotation=True,
            # The key only protects messages in flight; once the topic is gone it guards nothing.
            removal_policy=RemovalPolicy.DESTROY,
            pending_window=Duration.days(7),
        )
        # No aws:SourceAccount/SourceArn here: EventBridge's KMS request does not carry them, and
        # the topic policy below already limits who may publish. What SNS does carry is the topic
        # in the encryption context; the exact topic ARN would be a cycle (the topic names this
        # key), so the key serves only topics of this account and region. SNS needs no other
        # data-key call than GenerateDataKey.
        stack = Stack.of(self)
        key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowAlertServicesToUseKeyForTopic",
                principals=[iam.ServicePrincipal(service) for service in PUBLISHING_SERVICES],
                actions=["kms:GenerateDataKey", "kms:Decrypt"],
                resources=["*"],
                conditions={
                    "StringLike": {
                        SNS_TOPIC_CONTEXT: f"arn:{stack.partition}:sns:{stack.region}:{stack.account}:*",
                    }
                },
            )
        )
        return key

    def _topic(self) -> sns.Topic:
        topic = sns.Topic(
            self,
            "AlertsTopic",
            display_name="training-infra alerts",
            master_key=self.alerts_key,
            enforce_ssl=True,
        )
        stack = Stack.of(self)
        # Budget names are generated and the budget is created after this policy (Budgets checks
        # it may publish), so any budget of the account; alarms also come from the compute stack.
        # EventBridge gets its two rules by ARN in _ec2_warning_rules.
        _allow_publish(topic, "budgets.amazonaws.com", [f"arn:{stack.partition}:budgets::{stack.account}:*"])
        _allow_publish(
            topic,
            "cloudwatch.amazonaws.com",
            [f"arn:{stack.partition}:cloudwatch:{stack.region}:{stack.account}:alarm:*"],
        )
        if self._props.alert_email:
            topic.add_subscription(subscriptions.EmailSubscription(self._props.alert_email))
        return topic

    # --- budget ------------------------------------------------------------------------------

    def _budget(self) -> budgets.CfnBudget:
        def notification(kind: str, percent: int) -> budgets.CfnBudget.NotificationWithSubscribersProperty:
            return budgets.CfnBudget.NotificationWithSubscribersProperty(
                notification=budgets.CfnBudget.NotificationProperty(
                    notification_type=kind,
                    comparison_operator="GREATER_THAN",
                    threshold=percent,
                    threshold_type="PERCENTAGE",
                ),
                subscribers=[
                    budgets.CfnBudget.SubscriberProperty(subscription_type="SNS", address=self.alerts_topic.topic_arn)
                ],
            )

        budget = budgets.CfnBudget(
            self,
            "MonthlyBudget",
            budget=budgets.CfnBudget.BudgetDataProperty(
                budget_type="COST",
                time_unit="MONTHLY",
                budget_limit=budgets.CfnBudget.SpendProperty(amount=self._props.monthly_budget_usd, unit="USD"),
            ),
            notifications_with_subscribers=[notification("ACTUAL", p) for p in ACTUAL_THRESHOLDS]
            + [notification("FORECASTED", p) for p in FORECASTED_THRESHOLDS],
        )
        # Budgets checks it may publish when the budget is created: the topic policy must exist first.
        policy = self.alerts_topic.node.try_find_child("Policy")
        if policy is not None:
            budget.node.add_dependency(policy)
        return budget

    # --- functions ---------------------------------------------------------------------------

    def _function(self, construct_id: str, props: MonitoredFunctionProps) -> MonitoredFunction:
        return MonitoredFunction(
            self, construct_id, props=props, alerts_topic=self.alerts_topic, alerts_key=self.alerts_key
        )

    def _function_props(
        self,
        *,
        name: str,
        handler: str,
        description: str,
        failure_meaning: str,
        timeout: Duration,
        reserved_concurrency: int,
        retry_attempts: int,
        environment: dict[str, str],
    ) -> MonitoredFunctionProps:
        """A guard-rail function's props: its own parts, plus the code folder, retention and reservation they share."""
        return MonitoredFunctionProps(
            name=name,
            code_dir=RUNTIME_DIR,
            handler=handler,
            description=description,
            failure_meaning=failure_meaning,
            timeout=timeout,
            log_retention_days=self._props.log_retention_days,
            reserved_concurrency=reserved_concurrency if self._props.reserve_lambda_concurrency else None,
            retry_attempts=retry_attempts,
            environment=environment,
            alarm_period=Duration.minutes(REAPER_SCHEDULE_MINUTES),
        )

    def _reaper(self) -> MonitoredFunction:
        stack = Stack.of(self)
        # The compute stack's instance profile lives under this path; the reaper needs tag AND profile.
        profile_arns = f"arn:{stack.partition}:iam::{stack.account}:instance-profile{naming.INSTANCE_PROFILE_PATH}"
        reaper = self._function(
            "Reaper",
            self._function_props(
                name="reaper",
                handler="reaper.handler",
                description="Terminates managed training instances past their deadline",
                failure_meaning="An expired instance may still be running.",
                timeout=Duration.minutes(2),
                reserved_concurrency=1,  # one run at a time: no double terminations or notices
                retry_attempts=0,  # the next scheduled run is the retry
                environment={
                    "MAX_RUNTIME_HOURS": f"{self._props.max_runtime_hours:g}",
                    "GRACE_MINUTES": str(REAPER_GRACE_MINUTES),
                    "MANAGED_TAG": naming.TAG_MANAGED,
                    "RUN_ID_TAG": naming.TAG_RUN_ID,
                    "DEADLINE_TAG": naming.TAG_DEADLINE,
                    "MAX_RUNTIME_TAG": naming.TAG_MAX_RUNTIME_HOURS,
                    "METRIC_NAMESPACE": naming.METRIC_NAMESPACE,
                    "INSTANCE_PROFILE_ARN_PREFIX": profile_arns,
                },
            ),
        )
        reaper.add_to_role_policy(_describe_instances("FindManagedInstances"))
        reaper.add_to_role_policy(
            iam.PolicyStatement(
                sid="TerminateOnlyManagedInstances",
                actions=["ec2:TerminateInstances"],
                resources=[stack.format_arn(service="ec2", resource="instance", resource_name="*")],
                # The tag alone could be added to any instance by whoever may tag it; the instance
                # profile is set at launch and changed only by someone allowed to pass the role.
                conditions={
                    "StringEquals": {f"aws:ResourceTag/{naming.TAG_MANAGED}": "true"},
                    "ArnLike": {"ec2:InstanceProfile": f"{profile_arns}*"},
                },
            )
        )
        reaper.acknowledge(
            f"IAM5[Resource::{nag_name(self, stack.format_arn(service='ec2', resource='instance', resource_name='*'))}]",  # noqa: E501
            "Instance ids are not known at deploy time (the CLI launches them); TerminateInstances is "
            "conditioned on the training-infra:managed=true tag and the project's instance profile path.",
        )
        reaper.add_to_role_policy(
            iam.PolicyStatement(
                sid="PublishReaperMetric",
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],  # PutMetricData has no resource-level permissions; the namespace scopes it
                conditions={"StringEquals": {"cloudwatch:namespace": naming.METRIC_NAMESPACE}},
            )
        )
        reaper.acknowledge(
            "IAM5[Resource::*]",
            "ec2:DescribeInstances and cloudwatch:PutMetricData support no resource-level permissions; "
            "PutMetricData is limited to the TrainingInfra namespace by condition.",
        )
        events.Rule(
            self,
            "ReaperSchedule",
            description="Runs the max-runtime reaper",
            schedule=events.Schedule.rate(Duration.minutes(REAPER_SCHEDULE_MINUTES)),
            targets=[targets.LambdaFunction(reaper.function, retry_attempts=0)],
        )
        return reaper

    def _notifier(self) -> MonitoredFunction:
        notifier = self._function(
            "Notifier",
            self._function_props(
                name="notifier",
                handler="notifier.handler",
                description="Turns state changes of managed training instances into notices",
                failure_meaning="Some instance state notices were not sent.",
                timeout=Duration.seconds(30),
                reserved_concurrency=2,
                retry_attempts=2,  # Lambda's default for events; a notice is worth a retry
                environment={"MANAGED_TAG": naming.TAG_MANAGED, "RUN_ID_TAG": naming.TAG_RUN_ID},
            ),
        )
        notifier.add_to_role_policy(_describe_instances("ReadInstanceTags"))
        notifier.acknowledge(
            "IAM5[Resource::*]",
            "ec2:DescribeInstances supports no resource-level permissions; the function reads tags to tell "
            "managed instances from others.",
        )
        events.Rule(
            self,
            "InstanceStateRule",
            description="State changes of EC2 instances (the notifier keeps only managed ones)",
            event_pattern=events.EventPattern(
                source=["aws.ec2"],
                detail_type=["EC2 Instance State-change Notification"],
                detail={"state": list(NOTICE_STATES)},
            ),
            targets=[targets.LambdaFunction(notifier.function)],
        )
        return notifier

    # --- EC2 warnings straight to the topic ----------------------------------------------------

    def _ec2_warning_rules(self) -> None:
        """Spot interruption and rebalance warnings go to the topic directly: no code in the path."""
        instance = events.EventField.from_path("$.detail.instance-id")
        interruption = events.RuleTargetInput.from_text(
            f"Spot interruption warning: instance {instance} will be "
            f"{events.EventField.from_path('$.detail.instance-action')} in about 2 minutes "
            f"(at {events.EventField.time}). The training agent checkpoints and uploads logs now."
        )
        rebalance = events.RuleTargetInput.from_text(
            f"Spot rebalance recommendation: instance {instance} is at elevated risk of interruption "
            f"(since {events.EventField.time}). Checkpoints keep the run resumable."
        )
        rules = [
            events.Rule(
                self,
                construct_id,
                description=f"{detail_type} -> alert topic",
                event_pattern=events.EventPattern(source=["aws.ec2"], detail_type=[detail_type]),
                targets=[_TopicTarget(self.alerts_topic, message)],
            )
            for construct_id, detail_type, message in (
                ("SpotInterruptionRule", "EC2 Spot Instance Interruption Warning", interruption),
                ("RebalanceRecommendationRule", "EC2 Instance Rebalance Recommendation", rebalance),
            )
        ]
        _allow_publish(self.alerts_topic, "events.amazonaws.com", [rule.rule_arn for rule in rules])

    # --- alarms --------------------------------------------------------------------------------

    def _max_runtime_alarm(self) -> cloudwatch.Alarm:
        metric = cloudwatch.Metric(
            namespace=naming.METRIC_NAMESPACE,
            metric_name=MAX_RUNTIME_METRIC,
            statistic="Sum",
            period=Duration.minutes(REAPER_SCHEDULE_MINUTES),
        )
        alarm = metric.create_alarm(
            self,
            "MaxRuntimeAlarm",
            alarm_description="The reaper terminated a training instance that passed its max runtime.",
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm.add_alarm_action(cw_actions.SnsAction(self.alerts_topic))
        return alarm


def _allow_publish(topic: sns.Topic, service: str, source_arns: list[str]) -> None:
    """Let an AWS service publish to the topic, only for this account and only from these sources."""
    name = service.split(".", 1)[0].capitalize()
    topic.add_to_resource_policy(
        iam.PolicyStatement(
            sid=f"Allow{name}Publish",
            principals=[iam.ServicePrincipal(service)],
            actions=["sns:Publish"],
            resources=[topic.topic_arn],
            conditions={
                "StringEquals": {"aws:SourceAccount": Stack.of(topic).account},
                "ArnLike": {"aws:SourceArn": source_arns[0] if len(source_arns) == 1 else source_arns},
            },
        )
    )


def _describe_instances(sid: str) -> iam.PolicyStatement:
    """DescribeInstances has no resource-level permissions: `Resource: *` is the only form AWS accepts."""
    return iam.PolicyStatement(sid=sid, actions=["ec2:DescribeInstances"], resources=["*"])
