"""AWS access: the AWS CLI for transfers and rare calls, a small signed HTTP client for the per-minute ones.

Measured (docs/agent.md, "Why the standard library and the AWS CLI"): each `aws` process costs about
0.5 s of CPU, so the calls that come every few seconds (PutLogEvents, PutMetricData, progress.json)
are signed here with SigV4 over urllib and cost milliseconds; `aws s3 sync` and the calls made once
an attempt (ECR login, STS, Secrets Manager, SNS) stay with the CLI, which the AMI has and which
knows multipart uploads, parallel transfers and every credential source.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .imds import Imds, ImdsError

CLI_ENV = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "5", "AWS_PAGER": ""}
SIGNED_TIMEOUT_SECONDS = 10
SIGNED_ATTEMPTS = 3


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str = ""
    expires_at: float = float("inf")  # time.time()


class AwsError(Exception):
    """A signed call that failed for good; the message has the service's own words."""


class CredentialSource:
    """The environment's keys (off AWS), else the instance role's from IMDS, renewed 5 min before expiry."""

    def __init__(self, environ: Mapping[str, str], imds: Imds | None) -> None:
        self._environ = environ
        self._imds = imds
        self._cached: Credentials | None = None
        self._lock = threading.Lock()

    def get(self) -> Credentials:
        if self._environ.get("AWS_ACCESS_KEY_ID") and self._environ.get("AWS_SECRET_ACCESS_KEY"):
            return Credentials(
                self._environ["AWS_ACCESS_KEY_ID"],
                self._environ["AWS_SECRET_ACCESS_KEY"],
                self._environ.get("AWS_SESSION_TOKEN", ""),
            )
        with self._lock:
            if self._cached is None or time.time() > self._cached.expires_at - 300:
                self._cached = self._from_imds()
            return self._cached

    def _from_imds(self) -> Credentials:
        if self._imds is None:
            raise AwsError("no AWS credentials: none in the environment and no IMDS")
        try:
            role = (self._imds.get("meta-data/iam/security-credentials/") or "").strip().splitlines()
            body = self._imds.get(f"meta-data/iam/security-credentials/{role[0]}") if role else None
        except ImdsError as error:
            raise AwsError(str(error)) from error
        if not body:
            raise AwsError("no instance role credentials in IMDS")
        document = json.loads(body)
        expires = datetime.datetime.strptime(document["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
        return Credentials(
            document["AccessKeyId"],
            document["SecretAccessKey"],
            document.get("Token", ""),
            expires.replace(tzinfo=datetime.UTC).timestamp(),
        )


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign_v4(
    *,
    method: str,
    url: str,
    region: str,
    service: str,
    headers: dict[str, str],
    body: bytes,
    credentials: Credentials,
    now: datetime.datetime,
) -> dict[str, str]:
    """The headers of a SigV4-signed request (https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv.html)."""
    parts = urllib.parse.urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    payload = hashlib.sha256(body).hexdigest()
    signed = {k.lower(): v.strip() for k, v in headers.items()}
    signed.update({"host": parts.netloc, "x-amz-date": amz_date, "x-amz-content-sha256": payload})
    if credentials.token:
        signed["x-amz-security-token"] = credentials.token
    query = sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    canonical_query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}" for k, v in query
    )
    names = sorted(signed)
    canonical = "\n".join(
        [
            method,
            parts.path or "/",
            canonical_query,
            "".join(f"{name}:{signed[name]}\n" for name in names),
            ";".join(names),
            payload,
        ]
    )
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(("AWS4" + credentials.secret_key).encode(), amz_date[:8])
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    signed["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return signed


class Aws:
    """The agent's one door to AWS: `cli(...)` spawns the AWS CLI, the methods below sign in-process."""

    def __init__(
        self,
        *,
        region: str,
        environ: Mapping[str, str],
        imds: Imds | None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.region = region
        self._environ = dict(environ)
        self._credentials = CredentialSource(environ, imds)
        self._sleep = sleep

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

    # ------------------------------------------------------------ signed calls
    def _endpoint(self, service: str) -> str:
        own = self._own_endpoint(service)
        if own:
            return own.rstrip("/")
        suffix = "amazonaws.com.cn" if self.region.startswith("cn-") else "amazonaws.com"
        return f"https://{service}.{self.region}.{suffix}"

    def _own_endpoint(self, service: str) -> str:
        return self._environ.get(f"AWS_ENDPOINT_URL_{service.upper()}") or self._environ.get("AWS_ENDPOINT_URL", "")

    def _call(
        self, service: str, method: str, path: str, headers: dict[str, str], body: bytes, *, base: str = ""
    ) -> bytes:
        url = (base or self._endpoint(service)) + path
        last = ""
        for attempt in range(SIGNED_ATTEMPTS):
            signed = sign_v4(
                method=method,
                url=url,
                region=self.region,
                service=service,
                headers=headers,
                body=body,
                credentials=self._credentials.get(),
                now=datetime.datetime.now(datetime.UTC),
            )
            request = urllib.request.Request(url, data=body, method=method, headers=signed)  # noqa: S310 - an AWS https endpoint
            try:
                with urllib.request.urlopen(request, timeout=SIGNED_TIMEOUT_SECONDS) as response:  # noqa: S310
                    return response.read()
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code}: {error.read()[:500].decode(errors='replace')}"
                if error.code < 500 and error.code != 429 and b"Throttl" not in last.encode():
                    raise AwsError(f"{service} {headers.get('X-Amz-Target', method)}: {last}") from None
            except OSError as error:
                last = str(error)
            if attempt + 1 < SIGNED_ATTEMPTS:
                self._sleep(0.5 * 2**attempt)
        raise AwsError(f"{service}: {last}")

    def logs(self, operation: str, request: dict) -> dict:
        headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": f"Logs_20140328.{operation}"}
        answer = self._call("logs", "POST", "/", headers, json.dumps(request).encode())
        return json.loads(answer or b"{}")

    def put_metrics(self, namespace: str, metrics: Sequence[Metric]) -> None:
        form = {"Action": "PutMetricData", "Version": "2010-08-01", "Namespace": namespace}
        for i, metric in enumerate(metrics, 1):
            prefix = f"MetricData.member.{i}."
            form.update({prefix + "MetricName": metric.name, prefix + "Value": repr(float(metric.value))})
            form[prefix + "Unit"] = metric.unit
            for j, (name, value) in enumerate(metric.dimensions, 1):
                form[f"{prefix}Dimensions.member.{j}.Name"] = name
                form[f"{prefix}Dimensions.member.{j}.Value"] = value
        headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
        self._call("monitoring", "POST", "/", headers, urllib.parse.urlencode(form).encode())

    def put_object(self, bucket: str, key: str, body: bytes) -> None:
        """A small object: virtual-hosted on AWS (path-style is deprecated there), path-style at an own endpoint."""
        key_path = "/" + urllib.parse.quote(key, safe="/~")
        headers = {"Content-Type": "application/octet-stream"}
        if self._own_endpoint("s3") or "." in bucket:
            self._call("s3", "PUT", "/" + urllib.parse.quote(bucket) + key_path, headers, body)
        else:
            base = self._endpoint("s3").replace("https://", f"https://{bucket}.", 1)
            self._call("s3", "PUT", key_path, headers, body, base=base)


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str
    dimensions: tuple[tuple[str, str], ...]
