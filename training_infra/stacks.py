"""Deployment units, split by lifecycle: data outlives everything, compute comes and goes."""

from __future__ import annotations

from aws_cdk import App, CfnOutput, Fn, Stack, Validations
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from training_infra import naming
from training_infra.compute.construct import ComputeProps, InstanceProps, NetworkProps, RunDefaults, TrainingCompute
from training_infra.config import Settings
from training_infra.registry.construct import RegistryProps, TrainingRegistry
from training_infra.safety.construct import SafetyProps, TrainingSafety
from training_infra.storage.construct import StorageProps, TrainingStorage
from training_infra.supervisor.construct import (
    LaunchTarget,
    RunTable,
    SupervisorProps,
    TrainingSupervisor,
    training_user_policy,
)

DESCRIPTION = "training-infra: cheap, safe spot GPU training"


class StorageStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(
            scope, construct_id, description=f"{DESCRIPTION} - data and outputs (retained)", termination_protection=True
        )
        self.storage = TrainingStorage(self, "Storage", props=storage_props(settings))
        self.run_table = RunTable(self, "RunTable", retain=settings.retain_data)
        CfnOutput(
            self,
            naming.OUTPUT_TRAINING_BUCKET,
            value=self.storage.data_bucket.bucket_name,
            description="Training data: upload to data/",
        )
        CfnOutput(
            self,
            naming.OUTPUT_OUTPUTS_BUCKET,
            value=self.storage.outputs_bucket.bucket_name,
            description="Run outputs: runs/<run-id>/",
        )
        CfnOutput(
            self,
            naming.OUTPUT_RUN_TABLE,
            value=self.run_table.table.table_name,
            description="Managed runs and their attempts",
        )


class RegistryStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id, description=f"{DESCRIPTION} - training images and GitHub OIDC roles")
        self.registry = TrainingRegistry(self, "Registry", props=registry_props(settings))
        CfnOutput(
            self,
            naming.OUTPUT_ECR_REPOSITORY_URI,
            value=self.registry.repository.repository_uri,
            description="Push training images here",
        )
        if self.registry.push_role is not None:
            CfnOutput(
                self,
                naming.OUTPUT_GITHUB_ACTIONS_ROLE_ARN,
                value=self.registry.push_role.role_arn,
                description="GitHub secret AWS_ROLE_ARN (image push)",
            )
        if self.registry.diff_role is not None:
            CfnOutput(
                self,
                naming.OUTPUT_GITHUB_DIFF_ROLE_ARN,
                value=self.registry.diff_role.role_arn,
                description="GitHub secret AWS_DIFF_ROLE_ARN (cdk diff on PRs)",
            )


class SafetyStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id, description=f"{DESCRIPTION} - guard rails: reaper, budgets, notices")
        self.safety = TrainingSafety(self, "Safety", props=safety_props(settings))
        CfnOutput(
            self,
            naming.OUTPUT_ALERTS_TOPIC_ARN,
            value=self.safety.alerts_topic.topic_arn,
            description="Alerts and run notices",
        )


class ComputeStack(Stack):
    """The part that comes and goes; every arrow into it from the other stacks is drawn here."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        storage: TrainingStorage,
        run_table: RunTable,
        repository: ecr.IRepository,
        alerts_topic: sns.ITopic,
        alerts_key: kms.IKey,
        monthly_budget_name: str | None = None,
    ) -> None:
        super().__init__(
            scope, construct_id, description=f"{DESCRIPTION} - network, launch template, training instance"
        )
        self.compute = TrainingCompute(
            self,
            "Compute",
            props=compute_props(settings),
            data_bucket=storage.data_bucket,
            outputs_bucket=storage.outputs_bucket,
            repository=repository,
            alerts_topic=alerts_topic,
        )
        # A run reads data/ and writes runs/ and checkpoints/, nothing else of the buckets.
        storage.grant_run_access(self.compute.role)
        if self.compute.trainer_role is not None:
            # The opt-in trainer role: data/ and its own run's prefixes only (session tag = run id).
            storage.grant_trainer_access(self.compute.trainer_role)
            CfnOutput(
                self,
                naming.OUTPUT_TRAINER_ROLE_ARN,
                value=self.compute.trainer_role.role_arn,
                description=(
                    "trainer_s3_access: the agent assumes this role (session tag training-infra:run-id) "
                    "for the container"
                ),
            )
        # The supervisor keeps managed runs going: it launches with the instance role, records in the run table.
        self.supervisor = TrainingSupervisor(
            self,
            "Supervisor",
            props=SupervisorProps(
                log_retention_days=settings.log_retention_days,
                reserve_lambda_concurrency=settings.reserve_lambda_concurrency,
                monthly_limit_usd=settings.monthly_limit_usd or 0,
                allowed_instance_types=settings.allowed_instance_types,
                max_runtime_hours=settings.max_runtime_hours,
                max_nodes=settings.max_nodes,
                gang_replace_timeout_minutes=settings.gang_replace_timeout_minutes,
            ),
            run_table=run_table.table,
            outputs_bucket=storage.outputs_bucket,
            target=LaunchTarget(
                launch_template=self.compute.launch_template,
                vpc_id=self.compute.vpc.vpc_id,
                subnet_ids=self.compute.subnet_ids,
                security_group=self.compute.security_group,
                instance_profile=self.compute.instance_profile,
                instance_role=self.compute.role,
                image_id=self.compute.machine_image.get_image(self.compute).image_id,
            ),
            alerts_topic=alerts_topic,
            alerts_key=alerts_key,
            monthly_budget_name=monthly_budget_name,
        )
        # It keeps the run records and reads how each attempt ended.
        run_table.grant_records(self.supervisor.function.role)
        run_table.grant_records(self.supervisor.requests.role)
        storage.grant_read_attempt_status(self.supervisor.function.role)
        storage.grant_write_run_spec(self.supervisor.requests.role)  # runs/<id>/spec.yaml, kept with the run
        # The one trust boundary: users get this policy, and launch, resume and stop through the supervisor.
        user_policy = training_user_policy(
            self,
            "TrainingUserPolicy",
            supervisor=self.supervisor,
            run_table=run_table.table,
            data_bucket=storage.data_bucket,
            outputs_bucket=storage.outputs_bucket,
            repository=repository,
            log_group=self.compute.log_group,
        )
        CfnOutput(
            self,
            naming.OUTPUT_TRAINING_USER_POLICY_ARN,
            value=user_policy.managed_policy_arn,
            description="Attach to the people and roles that run training-infra: nothing more is needed",
        )
        CfnOutput(
            self,
            naming.OUTPUT_SUPERVISOR_FUNCTION,
            value=self.supervisor.requests.function.function_name,
            description="training-infra launch and stop invoke it (the supervisor's request function, the only one "
            "users may invoke)",
        )
        CfnOutput(
            self,
            naming.OUTPUT_ALLOWED_INSTANCE_TYPES,
            value=",".join(settings.allowed_instance_types),
            description="allowed_instance_types: the only types the supervisor launches",
        )
        CfnOutput(
            self,
            naming.OUTPUT_LAUNCH_TEMPLATE_ID,
            value=self.compute.launch_template.launch_template_id or "",
            description="training-infra launch starts runs from this",
        )
        CfnOutput(
            self,
            naming.OUTPUT_SUBNET_IDS,
            value=Fn.join(",", self.compute.subnet_ids),
            description="Subnets training-infra launch may use",
        )
        CfnOutput(
            self,
            naming.OUTPUT_MONTHLY_LIMIT_USD,
            value=f"{settings.monthly_limit_usd or 0:g}",
            description="monthly_limit_usd: training-infra launch reserves each run's most against it (0: none)",
        )
        CfnOutput(
            self,
            naming.OUTPUT_INSTANCE_TYPES,
            value=",".join(settings.instance_types or (settings.instance_type,)),
            description="Instance types a managed run may use (training-infra launch --instance-types overrides)",
        )
        CfnOutput(
            self,
            naming.OUTPUT_LOG_GROUP_NAME,
            value=self.compute.log_group.log_group_name,
            description="One log stream per run",
        )
        if self.compute.instance is not None:
            CfnOutput(
                self,
                naming.OUTPUT_INSTANCE_ID,
                value=self.compute.instance.ref,
                description="The training instance of this deploy",
            )


# --- props: each construct gets only the settings it reads ------------------------------------


def storage_props(settings: Settings) -> StorageProps:
    return StorageProps(
        retain_data=settings.retain_data,
        noncurrent_version_days=settings.noncurrent_version_days,
        checkpoint_retention_days=settings.checkpoint_retention_days,
    )


def registry_props(settings: Settings) -> RegistryProps:
    return RegistryProps(
        repository_name=settings.ecr_repository_name,
        github_repo=settings.github_repo,
        github_branch=settings.github_branch,
        existing_oidc_provider_arn=settings.existing_oidc_provider_arn,
    )


def safety_props(settings: Settings) -> SafetyProps:
    return SafetyProps(
        max_runtime_hours=settings.max_runtime_hours,
        monthly_budget_usd=settings.monthly_budget_usd,
        log_retention_days=settings.log_retention_days,
        alert_email=settings.alert_email,
        reserve_lambda_concurrency=settings.reserve_lambda_concurrency,
    )


def compute_props(settings: Settings) -> ComputeProps:
    return ComputeProps(
        network=NetworkProps(
            vpc_id=settings.vpc_id,
            subnet_ids=settings.subnet_ids,
            private_networking=settings.private_networking,
            availability_zones=settings.availability_zones,
        ),
        instance=InstanceProps(
            ami_parameter=settings.ami_parameter,
            instance_type=settings.instance_type,
            use_spot=settings.use_spot,
            spot_max_price=settings.spot_max_price,
            auto_shutdown=settings.auto_shutdown,
            volume_size_gb=settings.volume_size_gb,
            image_id=settings.image_id,
        ),
        run=RunDefaults(
            image_tag=settings.image_tag,
            training_command=settings.training_command,
            max_runtime_hours=settings.max_runtime_hours,
            idle_minutes=settings.idle_minutes,
            stall_minutes=settings.stall_minutes,
            idle_gpu_percent=settings.idle_gpu_percent,
            checkpoint_sync_seconds=settings.checkpoint_sync_seconds,
            data_access=settings.data_access,
        ),
        create_instance=settings.create_instance,
        run_id=settings.run_id,
        log_retention_days=settings.log_retention_days,
        trainer_s3_access=settings.trainer_s3_access,
    )


def new_app(**props) -> App:
    """The App as users, tests and benchmarks get it.

    CDK's built-in CloudFormation validator is off: measured on these machines it made each synth
    5-20 s slower (vs about 0.5 s without), and the real cfn-lint checks the templates instead, with
    no error and no warning allowed (`make synth` and the test gates on every configuration).
    """
    return App(builtin_cloud_formation_validation=False, **props)


def build_app(settings: Settings, *, app: App | None = None) -> App:
    """The whole app for one configuration; tests and app.py share it so tests check what users deploy."""
    app = app or new_app()
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    storage = StorageStack(app, naming.STORAGE_STACK, settings=settings)
    registry = RegistryStack(app, naming.REGISTRY_STACK, settings=settings)
    safety = SafetyStack(app, naming.SAFETY_STACK, settings=settings)
    ComputeStack(
        app,
        naming.COMPUTE_STACK,
        settings=settings,
        storage=storage.storage,
        run_table=storage.run_table,
        repository=registry.registry.repository,
        alerts_topic=safety.safety.alerts_topic,
        alerts_key=safety.safety.alerts_key,
        # Hard limits are opt-in: only with monthly_limit_usd does the budget also stop launches.
        monthly_budget_name=safety.safety.budget.ref if settings.monthly_limit_usd else None,
    )
    return app
