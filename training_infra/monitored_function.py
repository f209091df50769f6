"""One small Python Lambda with everything a guard-rail function needs around it.

The reaper, the notifier and (next) the supervisor are all the same shape: their own role and log
group, an errors alarm on the alert topic that says what a failure leaves undone, and the gate
notes (checkov skips, cdk-nag acknowledgements) that every such function carries. The shape lives
here once; each caller adds only its own permissions and reasons (docs/architecture.md, "Code layout").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from constructs import Construct

from training_infra.policy import (
    SNS_TOPIC_CONTEXT,
    acknowledge_nag,
    grant_encrypted_publish,
    log_retention,
    skip_checkov,
    skip_checkovs,
)

# The newest Python runtime in this aws-cdk-lib that AWS has not deprecated.
PYTHON_RUNTIME = lambda_.Runtime.PYTHON_3_14
__all__ = ["SNS_TOPIC_CONTEXT", "MonitoredFunction", "MonitoredFunctionProps", "PYTHON_RUNTIME"]


@dataclass(frozen=True)
class MonitoredFunctionProps:
    """What differs between the project's functions; everything else is the shared shape."""

    name: str  # what people read in alarms and role descriptions, e.g. "reaper"
    code_dir: Path  # the runtime folder beside the construct that deploys it
    handler: str
    description: str
    failure_meaning: str  # completes the errors alarm: what a failed run leaves undone
    timeout: Duration
    log_retention_days: int
    reserved_concurrency: int | None = None  # None: no reservation (accounts whose quota is 10)
    retry_attempts: int = 2
    environment: Mapping[str, str] = field(default_factory=dict)
    alarm_period: Duration = Duration.minutes(5)
    memory_mb: int = 128
    layers: tuple[lambda_.ILayerVersion, ...] = ()


class MonitoredFunction(Construct):
    """A Python function with its own least-privilege role, log group and errors alarm.

    The role may write the function's logs and publish to the (KMS-encrypted) alert topic; callers
    add the rest with `add_to_role_policy` and note each cdk-nag finding that causes with
    `acknowledge`. The function itself is the construct's default child, so its logical id is the
    one a plain `lambda_.Function(scope, id)` would have had.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        props: MonitoredFunctionProps,
        alerts_topic: sns.ITopic,
        alerts_key: kms.IKey,
    ) -> None:
        super().__init__(scope, construct_id)
        self.log_group = logs.LogGroup(
            self, "Logs", retention=log_retention(props.log_retention_days), removal_policy=RemovalPolicy.DESTROY
        )
        skip_checkovs(
            self.log_group,
            {
                "CKV_AWS_158": "Operational log lines (instance ids, counts), no secrets; CloudWatch Logs encrypts "
                "them at rest. A customer managed key would add cost and a key-policy dependency.",
                "CKV_AWS_338": "Retention is the user's log_retention_days setting (default 30); keeping a year of "
                "debug lines would only add storage cost.",
            },
        )
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"training-infra {props.name}: only what the function needs",
        )
        self.log_group.grant_write(self.role)
        grant_encrypted_publish(self.role, alerts_topic, alerts_key)

        # "Default" keeps the function's logical id what it was before this construct existed.
        self.function = lambda_.Function(
            self,
            "Default",
            description=props.description,
            runtime=PYTHON_RUNTIME,
            architecture=lambda_.Architecture.ARM_64,
            handler=props.handler,
            code=lambda_.Code.from_asset(str(props.code_dir), exclude=["__pycache__", "*.pyc"]),
            memory_size=props.memory_mb,
            layers=list(props.layers) or None,
            timeout=props.timeout,
            reserved_concurrent_executions=props.reserved_concurrency,
            role=self.role,
            log_group=self.log_group,
            environment={"TOPIC_ARN": alerts_topic.topic_arn, **props.environment},
            retry_attempts=props.retry_attempts,
        )
        # Lambda makes the function depend on its role, which its GetAtt already does (cfn-lint
        # W3005); keep only the dependency on the role's policy so permissions exist before a run.
        policy = self.role.node.find_child("DefaultPolicy").node.default_child
        self.function.node.default_child.add_override("DependsOn", [Stack.of(self).get_logical_id(policy)])
        skip_checkovs(
            self.function,
            {
                "CKV_AWS_116": "Invoked asynchronously by EventBridge; a failed run raises the Errors alarm, the "
                "next scheduled run redoes the work and a lost notice is only a notice, so a dead-letter queue "
                "would hold nothing actionable.",
                "CKV_AWS_117": "Calls only public AWS APIs (EC2, SNS, CloudWatch); a VPC would need a NAT gateway or "
                "interface endpoints (about $7-$22/month each) for no gain in isolation.",
                "CKV_AWS_173": "The environment holds no secrets (topic ARN, tag keys, hours); Lambda already "
                "encrypts it at rest with an AWS managed key.",
            },
        )
        if props.reserved_concurrency is None:
            skip_checkov(
                self.function,
                "CKV_AWS_115",
                "reserve_lambda_concurrency=false: the account's Lambda quota (10) cannot hold a reservation; "
                "an overlapping run at worst terminates an instance twice or repeats a notice.",
            )
        self.errors_alarm = self.function.metric_errors(period=props.alarm_period).create_alarm(
            self,
            "ErrorsAlarm",
            alarm_description=f"The training-infra {props.name} failed; see its log group. {props.failure_meaning}",
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.errors_alarm.add_alarm_action(cw_actions.SnsAction(alerts_topic))

    def add_to_role_policy(self, statement: iam.PolicyStatement) -> None:
        self.role.add_to_policy(statement)

    def acknowledge(self, finding: str, reason: str) -> None:
        """Accept one cdk-nag finding of the role's policy (e.g. `IAM5[Resource::*]`) with its reason."""
        acknowledge_nag(self.role, finding, reason)
