"""Names that outside systems (the CLI, the agent, the reaper, GitHub) must agree on.

Everything else gets a CloudFormation-generated physical name.
"""

import re

PROJECT = "training-infra"
STACK_PREFIX = "TrainingInfra"
STORAGE_STACK = f"{STACK_PREFIX}-Storage"
REGISTRY_STACK = f"{STACK_PREFIX}-Registry"
SAFETY_STACK = f"{STACK_PREFIX}-Safety"
COMPUTE_STACK = f"{STACK_PREFIX}-Compute"
ALL_STACKS = (STORAGE_STACK, REGISTRY_STACK, SAFETY_STACK, COMPUTE_STACK)

# Tags on every managed instance and its volumes; the reaper and the CLI find runs by them.
TAG_MANAGED = "training-infra:managed"
TAG_RUN_ID = "training-infra:run-id"
TAG_DEADLINE = "training-infra:deadline"  # ISO 8601 UTC, e.g. 2026-11-28T18:00:00Z
TAG_MAX_RUNTIME_HOURS = "training-infra:max-runtime-hours"
# No run is longer, whatever its tags say (the max_runtime_hours setting's bound; the reaper holds to it).
MAX_RUNTIME_HOURS_LIMIT = 168
# The IAM path of the instance profile every run is launched with. A tag anyone with ec2:CreateTags
# can add; this profile only someone allowed to pass the instance role: the reaper requires both.
INSTANCE_PROFILE_PATH = f"/{PROJECT}/"
TAG_ATTEMPT = "training-infra:attempt"  # 1, 2, ...: which attempt of its run an instance is
TAG_STOP = "training-infra:stop"  # set by the supervisor: the agent stops gracefully (user, budget, stall)
# Gangs (docs/architecture.md, "Multi-node runs"): the agent reads these from IMDS.
TAG_NODES = "training-infra:nodes"  # N, at launch
TAG_NODE = "training-infra:node"  # 0..N-1, set by the supervisor once the fleet returned (0 hosts the rendezvous)
TAG_RENDEZVOUS = "training-infra:rendezvous"  # node 0's private IPv4:29400


def run_tags(run_id: str, *, max_runtime_hours: float, deadline: str = "") -> dict[str, str]:
    """The tags that make an instance a managed run; the only place they are built (construct and CLI)."""
    tags = {TAG_MANAGED: "true", TAG_RUN_ID: run_id, TAG_MAX_RUNTIME_HOURS: f"{max_runtime_hours:g}"}
    if deadline:
        tags[TAG_DEADLINE] = deadline
    return tags


def instance_name(run_id: str) -> str:
    """The Name tag people see in the EC2 console."""
    return f"{PROJECT}-{run_id}"


# `launch --secret NAME=ssm:/PATH`: the secrets reader role may read SSM parameters only below this path.
SECRETS_PARAMETER_PATH = "/training-infra/"


# CloudWatch namespace for everything this project publishes (agent and reaper).
METRIC_NAMESPACE = "TrainingInfra"

# S3 layout (docs/architecture.md, "S3 layout").
DATA_PREFIX = "data/"
RUNS_PREFIX = "runs/"
LATEST_PREFIX = "runs/latest/"
CHECKPOINTS_PREFIX = "checkpoints/"

# CloudFormation output keys; the CLI answers to the seed's snake_case names.
OUTPUT_TRAINING_BUCKET = "TrainingBucket"
OUTPUT_OUTPUTS_BUCKET = "OutputsBucket"
OUTPUT_ECR_REPOSITORY_URI = "EcrRepositoryUri"
OUTPUT_GITHUB_ACTIONS_ROLE_ARN = "GithubActionsRoleArn"
OUTPUT_GITHUB_DIFF_ROLE_ARN = "GithubDiffRoleArn"
OUTPUT_ALERTS_TOPIC_ARN = "AlertsTopicArn"
OUTPUT_LAUNCH_TEMPLATE_ID = "LaunchTemplateId"
OUTPUT_LOG_GROUP_NAME = "LogGroupName"
OUTPUT_SUBNET_IDS = "SubnetIds"  # comma-joined; where `training-infra launch` may place runs
OUTPUT_INSTANCE_ID = "InstanceId"
OUTPUT_TRAINER_ROLE_ARN = "TrainerRoleArn"  # only with trainer_s3_access
OUTPUT_RUN_TABLE = "RunTableName"  # the managed runs' records
OUTPUT_MONTHLY_LIMIT_USD = "MonthlyLimitUsd"  # 0: none; `launch` reserves against it
OUTPUT_INSTANCE_TYPES = "InstanceTypes"  # comma-joined; what a managed run may use unless launch says otherwise
OUTPUT_ALLOWED_INSTANCE_TYPES = "AllowedInstanceTypes"  # comma-joined types or families: the supervisor's limit
OUTPUT_SUPERVISOR_FUNCTION = "SupervisorFunctionName"  # launch, resume and stop are invokes of it
OUTPUT_TRAINING_USER_POLICY_ARN = "TrainingUserPolicyArn"  # the managed policy a CLI user needs, nothing more
# Run launch templates: only the supervisor makes them (this name prefix and TAG_CREATED_BY=supervisor).
RUN_TEMPLATE_PREFIX = f"{PROJECT}-run-"
TAG_CREATED_BY = "training-infra:created-by"


def snake_case(output_key: str) -> str:
    """`GithubActionsRoleArn` -> `github_actions_role_arn` (the seed's terraform output names)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", output_key).lower()
