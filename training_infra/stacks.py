"""Deployment units, split by lifecycle: data outlives everything, compute comes and goes."""

from __future__ import annotations

from aws_cdk import App, CfnOutput, Fn, Stack, Validations
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from training_infra import naming
from training_infra.compute.construct import TrainingCompute
from training_infra.config import Settings
from training_infra.policy import acknowledge_nag
from training_infra.registry.construct import TrainingRegistry
from training_infra.safety.construct import TrainingSafety
from training_infra.storage.construct import TrainingStorage

DESCRIPTION = "training-infra: cheap, safe spot GPU training"


class StorageStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id, description=f"{DESCRIPTION} - data and outputs (retained)", termination_protection=True)
        self.storage = TrainingStorage(self, "Storage", settings=settings)
        CfnOutput(self, naming.OUTPUT_TRAINING_BUCKET, value=self.storage.data_bucket.bucket_name, description="Training data: upload to data/")
        CfnOutput(self, naming.OUTPUT_OUTPUTS_BUCKET, value=self.storage.outputs_bucket.bucket_name, description="Run outputs: runs/<run-id>/")


class RegistryStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id, description=f"{DESCRIPTION} - training images and GitHub OIDC roles")
        self.registry = TrainingRegistry(self, "Registry", settings=settings)
        CfnOutput(self, naming.OUTPUT_ECR_REPOSITORY_URI, value=self.registry.repository.repository_uri, description="Push training images here")
        if self.registry.push_role is not None:
            CfnOutput(self, naming.OUTPUT_GITHUB_ACTIONS_ROLE_ARN, value=self.registry.push_role.role_arn, description="GitHub secret AWS_ROLE_ARN (image push)")
        if self.registry.diff_role is not None:
            CfnOutput(self, naming.OUTPUT_GITHUB_DIFF_ROLE_ARN, value=self.registry.diff_role.role_arn, description="GitHub secret AWS_DIFF_ROLE_ARN (cdk diff on PRs)")
        _acknowledge_registry_findings(self)


class SafetyStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id, description=f"{DESCRIPTION} - guard rails: reaper, budgets, notices")
        self.safety = TrainingSafety(self, "Safety", settings=settings)
        CfnOutput(self, naming.OUTPUT_ALERTS_TOPIC_ARN, value=self.safety.alerts_topic.topic_arn, description="Alerts and run notices")


class ComputeStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, storage: TrainingStorage, registry: TrainingRegistry, safety: TrainingSafety) -> None:
        super().__init__(scope, construct_id, description=f"{DESCRIPTION} - network, launch template, training instance")
        self.compute = TrainingCompute(
            self,
            "Compute",
            settings=settings,
            storage=storage,
            repository=registry.repository,
            alerts_topic=safety.alerts_topic,
        )
        CfnOutput(self, naming.OUTPUT_LAUNCH_TEMPLATE_ID, value=self.compute.launch_template.launch_template_id or "", description="training-infra launch starts runs from this")
        CfnOutput(self, naming.OUTPUT_SUBNET_IDS, value=Fn.join(",", self.compute.subnet_ids), description="Subnets training-infra launch may use")
        CfnOutput(self, naming.OUTPUT_LOG_GROUP_NAME, value=self.compute.log_group.log_group_name, description="One log stream per run")
        if self.compute.instance is not None:
            CfnOutput(self, naming.OUTPUT_INSTANCE_ID, value=self.compute.instance.ref, description="The training instance of this deploy")
        _acknowledge_compute_findings(self)


def _acknowledge_compute_findings(stack: ComputeStack) -> None:
    compute = stack.compute
    policy = compute.role.node.find_child("DefaultPolicy")
    acknowledge_nag(
        compute.role,
        "IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore]",
        "AmazonSSMManagedInstanceCore is the AWS-maintained minimum for Session Manager shells; it follows SSM API changes",
    )
    acknowledge_nag(
        policy,
        "IAM5[Resource::*]",
        "Only actions without resource types: ecr:GetAuthorizationToken and cloudwatch:PutMetricData (limited by a namespace condition)",
    )
    acknowledge_nag(
        policy,
        "IAM5[Action::kms:GenerateDataKey*]",
        "From grant_publish on the alerts topic: only the topic's own KMS key, so notices can be encrypted",
    )
    storage_arns = {
        "Data": "TrainingInfra-Storage:ExportsOutputFnGetAttStorageDataBucketB1B922FAArn2EBC4078",
        "Outputs": "TrainingInfra-Storage:ExportsOutputFnGetAttStorageOutputsBucket49742862ArnCE1B3D81",
    }
    for bucket, prefix, why in (
        ("Data", naming.DATA_PREFIX, "read-only (s3:GetObject) on the data/ prefix of the data bucket"),
        ("Outputs", naming.RUNS_PREFIX, "get/put on runs/ of the outputs bucket: each run writes its own objects"),
        ("Outputs", naming.CHECKPOINTS_PREFIX, "get/put/delete on checkpoints/ of the outputs bucket: a mirror of the trainer's checkpoints"),
        ("Outputs", naming.LATEST_PREFIX, "delete only under runs/latest/, which mirrors the newest finished run"),
    ):
        acknowledge_nag(policy, f"IAM5[Resource::{storage_arns[bucket]}/{prefix}*]", f"Object keys are per run and unknown at deploy: {why}")
    if compute.instance is not None:
        acknowledge_nag(compute.instance, "EC29", "Spot instances cannot have termination protection; instances end themselves by design")


def _acknowledge_registry_findings(stack: RegistryStack) -> None:
    registry = stack.registry
    if registry.push_role is not None:
        acknowledge_nag(
            registry.push_role.node.find_child("DefaultPolicy"),
            "IAM5[Resource::*]",
            "ecr:GetAuthorizationToken has no resource type; pushes are limited to this repository",
        )
    if registry.diff_role is not None:
        acknowledge_nag(
            registry.diff_role.node.find_child("DefaultPolicy"),
            "IAM5[Resource::arn:<AWS::Partition>:cloudformation:<AWS::Region>:<AWS::AccountId>:stack/TrainingInfra-*/*]",
            "Read-only describe/get on this project's stacks; the stack ARN ends in a generated id",
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
    ComputeStack(app, naming.COMPUTE_STACK, settings=settings, storage=storage.storage, registry=registry.registry, safety=safety.safety)
    return app
