"""The cloud-side guard rails: alert topic, budget, max-runtime reaper, instance notices, alarms.

Everything here is cheap at rest (one KMS key, a few alarms, a Lambda that runs for a fraction of
a second every five minutes) and works even when the training instance is hung.
"""

from __future__ import annotations

import pathlib

import jsii
from aws_cdk import Acknowledgment, Duration, RemovalPolicy, Stack, Validations
from aws_cdk import aws_budgets as budgets
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from training_infra import naming
from training_infra.config import Settings
from training_infra.policy import log_retention, skip_checkov, skip_checkovs

RUNTIME_DIR = pathlib.Path(__file__).parent / "runtime"
# The newest Python runtime in this aws-cdk-lib that AWS has not deprecated.
PYTHON_RUNTIME = lambda_.Runtime.PYTHON_3_14
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
# SNS names the topic in the encryption context of every data key it asks KMS for.
SNS_TOPIC_CONTEXT = "kms:EncryptionContext:aws:sns:topicArn"


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


class TrainingSafety(Construct):
    """Alert topic, monthly budget, max-runtime reaper, EC2 notices and their alarms."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id)
        self._settings = settings
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
        if self._settings.alert_email:
            topic.add_subscription(subscriptions.EmailSubscription(self._settings.alert_email))
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
                budget_limit=budgets.CfnBudget.SpendProperty(amount=self._settings.monthly_budget_usd, unit="USD"),
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

    def _function(
        self,
        construct_id: str,
        *,
        handler: str,
        description: str,
        timeout: Duration,
        reserved_concurrency: int,
        retry_attempts: int,
        environment: dict[str, str],
        statements: list[iam.PolicyStatement],
        acknowledgments: dict[str, str],
        failure_meaning: str,
    ) -> lambda_.Function:
        """A small Python function with its own role, log group and an errors alarm.

        The role may write its logs and publish to the alert topic, plus `statements`;
        `acknowledgments` maps each cdk-nag finding those raise to its reason. `failure_meaning`
        completes the errors alarm's description: what a failed run leaves undone.
        """
        log_group = logs.LogGroup(
            self,
            f"{construct_id}Logs",
            retention=log_retention(self._settings.log_retention_days),
            removal_policy=RemovalPolicy.DESTROY,
        )
        role = iam.Role(
            self,
            f"{construct_id}Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"training-infra {construct_id.lower()}: only what the function needs",
        )
        log_group.grant_write(role)
        # Publishing to the encrypted topic: sns:Publish on it and the key's data-key calls.
        role.add_to_policy(iam.PolicyStatement(actions=["sns:Publish"], resources=[self.alerts_topic.topic_arn]))
        stack = Stack.of(self)
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["kms:GenerateDataKey", "kms:Decrypt"],
                resources=[self.alerts_key.key_arn],
                conditions={
                    "StringEquals": {
                        "kms:ViaService": f"sns.{stack.region}.{stack.url_suffix}",
                        SNS_TOPIC_CONTEXT: self.alerts_topic.topic_arn,
                    }
                },
            )
        )
        for statement in statements:
            role.add_to_policy(statement)
        Validations.of(role).acknowledge(*(Acknowledgment(id=i, reason=r) for i, r in acknowledgments.items()))
        function = lambda_.Function(
            self,
            construct_id,
            description=description,
            runtime=PYTHON_RUNTIME,
            architecture=lambda_.Architecture.ARM_64,
            handler=handler,
            code=lambda_.Code.from_asset(str(RUNTIME_DIR), exclude=["__pycache__", "*.pyc"]),
            memory_size=128,
            timeout=timeout,
            reserved_concurrent_executions=reserved_concurrency if self._settings.reserve_lambda_concurrency else None,
            role=role,
            log_group=log_group,
            environment={"TOPIC_ARN": self.alerts_topic.topic_arn, **environment},
            retry_attempts=retry_attempts,
        )
        # Lambda makes the function depend on its role, which its GetAtt already does (cfn-lint
        # W3005); keep only the dependency on the role's policy so permissions exist before a run.
        policy = role.node.find_child("DefaultPolicy").node.default_child
        function_cfn = function.node.default_child
        function_cfn.add_override("DependsOn", [Stack.of(self).get_logical_id(policy)])
        skip_checkovs(
            function,
            {
                "CKV_AWS_116": "Invoked asynchronously by EventBridge; a failed run raises the Errors alarm, the "
                "reaper's next scheduled run redoes its work and a lost notice is only a notice, so a dead-letter "
                "queue would hold nothing actionable.",
                "CKV_AWS_117": "Calls only public AWS APIs (EC2, SNS, CloudWatch); a VPC would need a NAT gateway or "
                "interface endpoints (about $7-$22/month each) for no gain in isolation.",
                "CKV_AWS_173": "The environment holds no secrets (topic ARN, tag keys, hours); Lambda already "
                "encrypts it at rest with an AWS managed key.",
            },
        )
        if not self._settings.reserve_lambda_concurrency:
            skip_checkov(
                function,
                "CKV_AWS_115",
                "reserve_lambda_concurrency=false: the account's Lambda quota (10) cannot hold a reservation; "
                "an overlapping run at worst terminates an instance twice or repeats a notice.",
            )
        skip_checkovs(
            log_group,
            {
                "CKV_AWS_158": "Operational log lines (instance ids, counts), no secrets; CloudWatch Logs encrypts "
                "them at rest. A customer managed key would add cost and a key-policy dependency.",
                "CKV_AWS_338": "Retention is the user's log_retention_days setting (default 30); keeping a year of "
                "debug lines would only add storage cost.",
            },
        )
        function.metric_errors(period=Duration.minutes(REAPER_SCHEDULE_MINUTES)).create_alarm(
            self,
            f"{construct_id}ErrorsAlarm",
            alarm_description=f"The training-infra {construct_id.lower()} failed; see its log group. {failure_meaning}",
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        ).add_alarm_action(cw_actions.SnsAction(self.alerts_topic))
        return function

    def _reaper(self) -> lambda_.Function:
        reaper = self._function(
            "Reaper",
            handler="reaper.handler",
            description="Terminates managed training instances past their deadline",
            timeout=Duration.minutes(2),
            reserved_concurrency=1,  # one run at a time: no double terminations or notices
            retry_attempts=0,  # the next scheduled run is the retry
            environment={
                "MAX_RUNTIME_HOURS": f"{self._settings.max_runtime_hours:g}",
                "GRACE_MINUTES": str(REAPER_GRACE_MINUTES),
                "MANAGED_TAG": naming.TAG_MANAGED,
                "RUN_ID_TAG": naming.TAG_RUN_ID,
                "DEADLINE_TAG": naming.TAG_DEADLINE,
                "MAX_RUNTIME_TAG": naming.TAG_MAX_RUNTIME_HOURS,
                "METRIC_NAMESPACE": naming.METRIC_NAMESPACE,
            },
            statements=[
                _describe_instances("FindManagedInstances"),
                iam.PolicyStatement(
                    sid="TerminateOnlyManagedInstances",
                    actions=["ec2:TerminateInstances"],
                    resources=[Stack.of(self).format_arn(service="ec2", resource="instance", resource_name="*")],
                    conditions={"StringEquals": {f"aws:ResourceTag/{naming.TAG_MANAGED}": "true"}},
                ),
                iam.PolicyStatement(
                    sid="PublishReaperMetric",
                    actions=["cloudwatch:PutMetricData"],
                    resources=["*"],  # PutMetricData has no resource-level permissions; the namespace scopes it
                    conditions={"StringEquals": {"cloudwatch:namespace": naming.METRIC_NAMESPACE}},
                ),
            ],
            acknowledgments={
                "AwsSolutions-IAM5[Resource::*]": "ec2:DescribeInstances and cloudwatch:PutMetricData support no "
                "resource-level permissions; PutMetricData is limited to the TrainingInfra namespace by condition.",
                "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:instance/*]": (
                    "Instance ids are not known at deploy time (the CLI launches them); TerminateInstances is "
                    "conditioned on the aws:ResourceTag/training-infra:managed=true tag."
                ),
            },
            failure_meaning="An expired instance may still be running.",
        )
        events.Rule(
            self,
            "ReaperSchedule",
            description="Runs the max-runtime reaper",
            schedule=events.Schedule.rate(Duration.minutes(REAPER_SCHEDULE_MINUTES)),
            targets=[targets.LambdaFunction(reaper, retry_attempts=0)],
        )
        return reaper

    def _notifier(self) -> lambda_.Function:
        notifier = self._function(
            "Notifier",
            handler="notifier.handler",
            description="Turns state changes of managed training instances into notices",
            timeout=Duration.seconds(30),
            reserved_concurrency=2,
            retry_attempts=2,  # Lambda's default for events; a notice is worth a retry
            environment={"MANAGED_TAG": naming.TAG_MANAGED, "RUN_ID_TAG": naming.TAG_RUN_ID},
            statements=[_describe_instances("ReadInstanceTags")],
            acknowledgments={
                "AwsSolutions-IAM5[Resource::*]": "ec2:DescribeInstances supports no resource-level permissions; "
                "the function reads tags to tell managed instances from others.",
            },
            failure_meaning="Some instance state notices were not sent.",
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
            targets=[targets.LambdaFunction(notifier)],
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

