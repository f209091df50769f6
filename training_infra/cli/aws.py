"""AWS access for the verbs: one botocore session, the stacks' outputs, runs found by their tags.

Region and credentials come the standard boto3 way (env, profile, SSO, instance role);
AWS_ENDPOINT_URL is honoured by botocore itself, which is how the local AWS is reached.
The clients are plain botocore clients: boto3 (and with it s3transfer) is imported only by the
verbs that move files, so `launch` starts without it.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from training_infra import naming
from training_infra.cli.errors import CliError, UsageError

if TYPE_CHECKING:
    import botocore.session

# Which stack publishes which output (docs/architecture.md, "CloudFormation outputs").
OUTPUT_STACKS: dict[str, str] = {
    naming.OUTPUT_TRAINING_BUCKET: naming.STORAGE_STACK,
    naming.OUTPUT_OUTPUTS_BUCKET: naming.STORAGE_STACK,
    naming.OUTPUT_RUN_TABLE: naming.STORAGE_STACK,
    naming.OUTPUT_ECR_REPOSITORY_URI: naming.REGISTRY_STACK,
    naming.OUTPUT_GITHUB_ACTIONS_ROLE_ARN: naming.REGISTRY_STACK,
    naming.OUTPUT_GITHUB_DIFF_ROLE_ARN: naming.REGISTRY_STACK,
    naming.OUTPUT_ALERTS_TOPIC_ARN: naming.SAFETY_STACK,
    naming.OUTPUT_LAUNCH_TEMPLATE_ID: naming.COMPUTE_STACK,
    naming.OUTPUT_LOG_GROUP_NAME: naming.COMPUTE_STACK,
    naming.OUTPUT_SUBNET_IDS: naming.COMPUTE_STACK,
    naming.OUTPUT_INSTANCE_TYPES: naming.COMPUTE_STACK,
    naming.OUTPUT_MONTHLY_LIMIT_USD: naming.COMPUTE_STACK,
    naming.OUTPUT_INSTANCE_ID: naming.COMPUTE_STACK,
    naming.OUTPUT_ALLOWED_INSTANCE_TYPES: naming.COMPUTE_STACK,
    naming.OUTPUT_SUPERVISOR_FUNCTION: naming.COMPUTE_STACK,
    naming.OUTPUT_TRAINING_USER_POLICY_ARN: naming.COMPUTE_STACK,
}
SNAKE_TO_KEY = {naming.snake_case(key): key for key in OUTPUT_STACKS}
# Outputs that exist only with some settings; their absence is not a broken deployment.
_CONDITIONAL = {
    naming.OUTPUT_GITHUB_ACTIONS_ROLE_ARN: "the stacks were deployed without github_repo",
    naming.OUTPUT_GITHUB_DIFF_ROLE_ARN: "the stacks were deployed without github_repo",
    naming.OUTPUT_INSTANCE_ID: "the compute stack was deployed without create_instance=true",
}


@functools.cache
def _client_config() -> Any:
    """Standard retry mode unless the user chose one (AWS_RETRY_MODE / AWS_MAX_ATTEMPTS win).

    botocore is imported when a verb first calls AWS, not when `--help` is asked for."""
    import botocore.config

    return botocore.config.Config(retries={"mode": "standard"}, user_agent_extra="training-infra-cli")


class _JSONFileLoader:
    """botocore's model file loader (the `file_loader` a `Loader` accepts), decoding into dicts.

    botocore decodes its JSON models with `object_pairs_hook=OrderedDict`, which takes about twice
    as long as plain dicts (ordered too, since Python 3.7; botocore/issues/2553). The EC2 model
    is 4 MB of JSON, so this is the larger part of creating the EC2 client that `launch` needs.
    """

    _SUFFIXES = ((".json", open), (".json.gz", gzip.open))

    def exists(self, file_path: str) -> bool:
        return any(os.path.isfile(file_path + suffix) for suffix, _ in self._SUFFIXES)

    def load_file(self, file_path: str) -> Any:
        for suffix, open_file in self._SUFFIXES:
            if os.path.isfile(file_path + suffix):
                with open_file(file_path + suffix, "rb") as handle:
                    return json.loads(handle.read())
        return None


@functools.cache
def _loader() -> Any:
    import botocore.loaders

    return botocore.loaders.Loader(file_loader=_JSONFileLoader())


class NotDeployedError(CliError):
    """A stack is absent in this region (as opposed to AWS being unreachable or misconfigured)."""


# Every AWS partition's region names: us-east-1, eu-central-2, us-gov-west-1, cn-north-1, eu-isoe-west-1.
_REGION_NAME = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")


@dataclass
class Aws:
    """Clients and stack outputs for one invocation, created lazily and cached."""

    region: str | None = None
    _session: botocore.session.Session | None = field(default=None, init=False, repr=False)
    _outputs: dict[str, dict[str, str]] = field(default_factory=dict, init=False, repr=False)
    _clients: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    @property
    def session(self) -> botocore.session.Session:
        """One session per invocation (credentials and region read now), its region settled.

        It shares one model loader per process: parsing the EC2 model is the costliest part of
        creating its client, and callers that run several verbs in one process (tests,
        notebooks) pay it once.
        """
        if self._session is None:
            if self.region is not None and not _REGION_NAME.fullmatch(self.region):
                raise UsageError(
                    f"option '--region': got {self.region!r}; allowed: an AWS region name such as us-east-1"
                )
            import botocore.exceptions
            import botocore.session

            session = botocore.session.get_session()
            session.register_component("data_loader", _loader())
            # botocore reads AWS_DEFAULT_REGION only; the other AWS SDKs and CLI v2 also read AWS_REGION.
            region = self.region or session.get_config_variable("region") or os.environ.get("AWS_REGION")
            if not region:
                raise botocore.exceptions.NoRegionError()
            session.set_config_variable("region", region)
            self._session = session
        return self._session

    @property
    def region_name(self) -> str:
        return self.session.get_config_variable("region")

    def client(self, service: str) -> Any:
        """A botocore client, created once per service (only the services a verb uses)."""
        if service not in self._clients:
            try:
                self._clients[service] = self.session.create_client(service, config=_client_config())
            except ValueError as error:  # botocore's configuration checks (endpoint URL, region name, ...)
                raise CliError(_configuration_error(service, error)) from None
        return self._clients[service]

    def stack_outputs(self, stack: str) -> dict[str, str]:
        """OutputKey -> OutputValue of a deployed stack, or a clear 'not deployed' error."""
        if stack not in self._outputs:
            import botocore.exceptions

            try:
                found = self.client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
            except botocore.exceptions.ClientError as error:
                if "does not exist" in error.response.get("Error", {}).get("Message", ""):
                    raise NotDeployedError(
                        f"stack {stack} is not deployed in {self.region_name}: run `make deploy`"
                    ) from None
                raise
            status = found[0].get("StackStatus", "") if found else ""
            if not found or status.startswith("DELETE") or status == "ROLLBACK_COMPLETE":
                raise NotDeployedError(
                    f"stack {stack} is not deployed in {self.region_name} ({status or 'absent'}): run `make deploy`"
                )
            self._outputs[stack] = {o["OutputKey"]: o["OutputValue"] for o in found[0].get("Outputs", [])}
        return self._outputs[stack]

    def output(self, key: str) -> str:
        """One output by its CloudFormation key, explaining why it may be missing."""
        stack = OUTPUT_STACKS[key]
        outputs = self.stack_outputs(stack)
        if key not in outputs:
            why = _CONDITIONAL.get(key, "the stack is older than this command: run `make deploy`")
            raise CliError(f"stack {stack} has no output {naming.snake_case(key)} ({why})")
        return outputs[key]


def _configuration_error(service: str, error: ValueError) -> str:
    """One line for a configuration botocore refuses, naming the variable that holds it when it is one."""
    for variable in (f"AWS_ENDPOINT_URL_{service.upper()}", "AWS_ENDPOINT_URL"):
        value = os.environ.get(variable)
        if value is not None and "endpoint" in str(error).lower():
            return (
                f"environment variable '{variable}': got {value!r}; allowed: a URL with its scheme, "
                "such as http://localhost:5000 or https://s3.us-east-1.amazonaws.com"
            )
    return f"AWS configuration error: {error}: check AWS_* variables and ~/.aws/config"


def output_key_for(name: str) -> str:
    """`training_bucket` (or `TrainingBucket`) -> `TrainingBucket`; usage error otherwise."""
    if name in SNAKE_TO_KEY:
        return SNAKE_TO_KEY[name]
    if name in OUTPUT_STACKS:
        return name
    raise UsageError(f"unknown output {name!r}; known outputs: {', '.join(SNAKE_TO_KEY)}")
