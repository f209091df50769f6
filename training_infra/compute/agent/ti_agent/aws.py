"""AWS access: botocore clients for the per-minute calls, the AWS CLI for transfers and rare calls.

Measured (docs/agent.md, "Why a vendored botocore for the frequent calls, the AWS CLI for the rest"):
each `aws` process costs about 0.5 s of CPU, so the calls that come every few seconds (PutLogEvents,
PutMetricData, progress.json) go through botocore clients made once in this process, which sign,
find credentials (the environment, else the instance role from IMDSv2, renewed before expiry),
retry and resolve endpoints (AWS_ENDPOINT_URL and its per-service variants). botocore travels in
the agent's asset, stripped to the services in SERVICES. `aws s3 sync` and the calls made once an
attempt (ECR login, STS, Secrets Manager, SNS) stay with the CLI, which the AMI has and which knows
multipart uploads and parallel transfers.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The botocore clients the agent creates; the asset carries botocore/data/<name> for these alone
# (training_infra/compute/user_data.py packs from this tuple, and a test creates each one offline).
SERVICES = ("cloudwatch", "logs", "s3")
CLI_ENV = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "5", "AWS_PAGER": ""}
CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 10
MAX_ATTEMPTS = 3  # the first call included: botocore's standard mode retries throttling, 5xx and resets


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class AwsError(Exception):
    """A call that failed for good (botocore retried what was worth retrying); `code` is the service's error code."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class Aws:
    """The agent's one door to AWS: `cli(...)` spawns the AWS CLI, the methods below use botocore clients.

    One botocore session, each client made on first use and kept for the attempt (importing botocore
    and making a client cost CPU once, never per call); botocore reads its settings (endpoints, IMDS,
    keys) from the process environment, which is the agent's.
    """

    def __init__(self, *, region: str, environ: Mapping[str, str]) -> None:
        self.region = region
        self._environ = dict(environ)
        self._session: Any = None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the AWS CLI
    def cli_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {**self._environ, **{k: v for k, v in CLI_ENV.items() if k not in self._environ}}
        if self.region:
            env.update(AWS_DEFAULT_REGION=self.region, AWS_REGION=self.region)
        return {**env, **(extra or {})}

    def cli(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
        timeout: float | None = None,
    ) -> CliResult:
        try:
            done = subprocess.run(  # noqa: S603 - the AWS CLI, arguments as a list
                ["aws", "--cli-connect-timeout", "10", *args],
                env=self.cli_env(env),
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return CliResult(124, "", f"aws {args[0] if args else ''} timed out after {timeout}s")
        except OSError as error:
            return CliResult(127, "", f"aws: {error}")
        return CliResult(done.returncode, done.stdout, done.stderr.strip())

    # ------------------------------------------------------------ botocore
    def client(self, service: str) -> Any:
        """The one client for `service` (one of SERVICES: the asset has no other service's data)."""
        if service not in SERVICES:
            raise ValueError(f"{service!r} is not in SERVICES {SERVICES}: the agent's asset has no data for it")
        with self._lock:  # a botocore session is not thread-safe; its clients are
            if service not in self._clients:
                import botocore.config  # noqa: PLC0415 - ~0.2 s of imports, paid when the first call is made
                import botocore.session  # noqa: PLC0415

                if self._session is None:
                    self._session = botocore.session.get_session()
                    self._session.set_config_variable("metadata_service_num_attempts", 3)
                config = botocore.config.Config(
                    connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    read_timeout=READ_TIMEOUT_SECONDS,
                    retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                    user_agent_extra="training-infra-agent",
                )
                self._clients[service] = self._session.create_client(
                    service, region_name=self.region or None, config=config
                )
            return self._clients[service]

    def _call(self, service: str, operation: str, **params: Any) -> dict:
        import botocore.exceptions  # noqa: PLC0415 - imported by client() already

        try:
            return getattr(self.client(service), operation)(**params)
        except botocore.exceptions.ClientError as error:
            raise AwsError(f"{service} {operation}: {error}", error.response.get("Error", {}).get("Code", "")) from None
        except botocore.exceptions.BotoCoreError as error:
            raise AwsError(f"{service} {operation}: {error}") from None

    def create_log_stream(self, group: str, stream: str) -> None:
        self._call("logs", "create_log_stream", logGroupName=group, logStreamName=stream)

    def put_log_events(self, group: str, stream: str, events: Sequence[dict]) -> None:
        self._call("logs", "put_log_events", logGroupName=group, logStreamName=stream, logEvents=list(events))

    def put_metrics(self, namespace: str, metrics: Sequence[Metric]) -> None:
        data = [
            {
                "MetricName": metric.name,
                "Value": float(metric.value),
                "Unit": metric.unit,
                "Dimensions": [{"Name": name, "Value": value} for name, value in metric.dimensions],
            }
            for metric in metrics
        ]
        self._call("cloudwatch", "put_metric_data", Namespace=namespace, MetricData=data)

    def put_object(self, bucket: str, key: str, body: bytes) -> None:
        self._call("s3", "put_object", Bucket=bucket, Key=key, Body=body, ContentType="application/octet-stream")

    # A gang's checkpoint sync (gang.py) looks every few seconds: in-process calls, no CLI process each.
    def latest_versions(self, bucket: str, prefix: str) -> dict[str, dict]:
        """key -> {version_id, size} of the newest version of each object under `prefix`."""
        found: dict[str, dict] = {}
        params: dict[str, str] = {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = self._call("s3", "list_object_versions", **params)
            for version in page.get("Versions", []):
                if version.get("IsLatest"):
                    found[version["Key"]] = {"version_id": version.get("VersionId") or "null", "size": version["Size"]}
            if not page.get("IsTruncated"):
                return found
            params = {**params, "KeyMarker": page["NextKeyMarker"], "VersionIdMarker": page["NextVersionIdMarker"]}

    def get_object(self, bucket: str, key: str) -> bytes:
        return self._call("s3", "get_object", Bucket=bucket, Key=key)["Body"].read()

    def delete_keys(self, bucket: str, keys: Sequence[str]) -> None:
        """Up to 1,000 a call (the API's limit); AwsError naming the first key that failed."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            answer = self._call("s3", "delete_objects", Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):  # Quiet: only the keys that failed come back
                first = answer["Errors"][0]
                raise AwsError(f"s3 delete_objects: {first.get('Key')}: {first.get('Code')}", first.get("Code", ""))


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str
    dimensions: tuple[tuple[str, str], ...]
