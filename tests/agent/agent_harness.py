"""One agent run against moto and a fake IMDS, shared by the agent tests and scripts/bench_agent.py.

`new_run(aws, run_dir, **AgentConfig overrides)` gives every run its own buckets (the example
dataset uploaded), ECR repository with an image, log group and alert topic (a uuid in the names,
so runs are independent and safe under pytest-xdist), fake `shutdown`/`poweroff`/`nvidia-smi`,
a fresh `FakeImds`, the packed agent in an assets bucket (as cdk deploy uploads the compute
construct's asset), and the environment that runs the real rendered user data under bash with the
`process` runtime, or, given a `ContainerEngine` (training_infra/local/containers.py), with the
production `docker` runtime: the busybox trainer image pushed to the engine's registry under the
run's ECR repository name, and the agent started where that registry answers as ECR. Between the
agent and moto sits a small reverse proxy that records every AWS request in order (to prove that
`_SUCCESS` is written last) and can fail S3 requests on purpose.
Timings not given are the production defaults of `AgentConfig`; the tests pass faster ones.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import boto3

from training_infra.compute.user_data import AgentConfig, AgentObject, agent_sha256, pack_agent, render_user_data
from training_infra.local.containers import ContainerEngine
from training_infra.local.emulator import FAKE_CREDENTIALS, Emulator
from training_infra.local.imds import FakeImds

REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / "examples" / "trainer" / "train.py"
DATA_DIR = REPO / "examples" / "data"
ACCOUNT = "123456789012"
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 7,
            "digest": "sha256:" + "a" * 64,
        },
        "layers": [],
    }
)

# A trainer hung in a collective, for the stall diagnostics: it beats once, then waits for ever in a
# function py-spy must name. The tests put it in the data bucket, so it is $DATA_DIR/hung_trainer.py
# in both runtimes (/data in the container), and run it with HUNG_TRAINER_COMMAND.
HUNG_TRAINER = """\
import json, os, time


def wait_for_allreduce():
    while True:  # a peer died: the GPU spins, nothing moves
        time.sleep(1)


with open(os.environ["HEARTBEAT_FILE"], "w") as beat:
    json.dump({"step": 1}, beat)
print("step 1 done; entering allreduce", flush=True)
wait_for_allreduce()
"""
HUNG_TRAINER_COMMAND = 'exec python3 "$DATA_DIR/hung_trainer.py"'


def diagnostic_sections(text: str) -> dict[str, str]:
    """training-diagnostics.txt by its `== ` headings: {"process tree": ..., "<nvidia-smi path>": ...,
    "py-spy dump --pid N": ..., "the trainer's last 200 log lines": ...} (the tree's heading without its time)."""
    parts = re.split(r"^== (.*)\n", text, flags=re.MULTILINE)
    heads = [re.sub(r"^\S+Z process tree$", "process tree", head) for head in parts[1::2]]
    return dict(zip(heads, parts[2::2], strict=True))


def hung_trainer_stack(diagnostics: str) -> str:
    """The py-spy dump of the hung trainer's python process (found in the process tree by its script)."""
    sections = diagnostic_sections(diagnostics)
    # The tree is the machine's: another test's hung trainer may be in it too; this box's is the one dumped.
    pids = [line.split()[0] for line in sections["process tree"].splitlines() if line.endswith("hung_trainer.py")]
    dumped = [pid for pid in pids if f"py-spy dump --pid {pid}" in sections]
    if len(dumped) != 1:
        return f"(not one py-spy dump of the hung trainers {pids}: {len(dumped)} dumped)"
    return sections[f"py-spy dump --pid {dumped[0]}"]


# ---------------------------------------------------------------- recording / fault-injecting proxy
@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str
    service: str
    status: int
    at: float = 0.0  # time.time() when the answer was sent


@dataclass
class Throttle:
    """A link of `bytes_per_second` shared by every S3 GET whose path has `matching`: answers wait
    their turn, as on one slow link (the AWS CLI's parallel requests do not multiply it)."""

    matching: str
    bytes_per_second: float
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pace(self, size: int) -> None:
        with self.lock:
            time.sleep(size / self.bytes_per_second)


class AwsProxy:
    """Reverse proxy in front of moto: records requests; `fail_s3_every=N` answers every Nth S3
    request with 503 SlowDown (what S3 says under load), which the AWS CLI must retry;
    `refuse_s3_writes_under` refuses S3 writes to matching paths (a bucket policy gone wrong),
    `refuse_s3_reads_matching` S3 reads and listings whose path or query has that text."""

    def __init__(self, upstream: str, fail_s3_every: int = 0) -> None:
        self.upstream = urlsplit(upstream)
        self.fail_s3_every = fail_s3_every
        # Set to a path part such as "/checkpoints/": S3 writes there are refused with 403 AccessDenied.
        self.refuse_s3_writes_under = ""
        # Set to a text such as "notices": S3 GETs (reads, listings) whose path or query has it get 403 AccessDenied.
        self.refuse_s3_reads_matching = ""
        # Set to a path part: S3 writes there hang (a slow link) until `release` (then 503); `held` is
        # set once one hangs, so a test can kill the box in the middle of that upload.
        self.hold_s3_writes_under = ""
        self.held = threading.Event()
        self.release = threading.Event()
        # S3 GETs through a slow link: `proxy.throttles.append(Throttle("/data-", 1e6))`.
        self.throttles: list[Throttle] = []
        self.requests: list[ProxiedRequest] = []
        self.injected_failures = 0
        self._s3_count = 0
        self._lock = threading.Lock()
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def refuses(self, service: str, method: str, path: str) -> bool:
        under, reads = self.refuse_s3_writes_under, self.refuse_s3_reads_matching
        if service != "s3":
            return False
        refused_write = bool(under) and method in ("PUT", "POST") and under in path
        return refused_write or bool(reads) and method == "GET" and reads in path

    def should_fail(self, service: str) -> bool:
        with self._lock:
            if service != "s3" or not self.fail_s3_every:
                return False
            self._s3_count += 1
            if self._s3_count % self.fail_s3_every == 0:
                self.injected_failures += 1
                return True
            return False

    def record(self, request: ProxiedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


class _ProxyHandler(BaseHTTPRequestHandler):
    proxy: AwsProxy
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        scope = re.search(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/aws4_request", self.headers.get("Authorization", ""))
        service = scope.group(1) if scope else "?"
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hold = self.proxy.hold_s3_writes_under
        if hold and service == "s3" and self.command in ("PUT", "POST") and hold in self.path:
            self.proxy.held.set()
            self.proxy.release.wait(timeout=120)
            return self._error(service, 503, "SlowDown", "held by the test")
        if self.proxy.refuses(service, self.command, self.path):
            return self._error(service, 403, "AccessDenied", "Access Denied")
        if self.proxy.should_fail(service):
            return self._error(service, 503, "SlowDown", "Please reduce your request rate.")
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection", "transfer-encoding")
        }
        upstream = http.client.HTTPConnection(self.proxy.upstream.hostname, self.proxy.upstream.port, timeout=60)
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(payload)))
        if service == "s3" and self.command == "GET":
            for throttle in self.proxy.throttles:
                if throttle.matching in self.path:
                    throttle.pace(len(payload))
        self.end_headers()
        upstream.close()
        self.proxy.record(ProxiedRequest(self.command, self.path, service, response.status, time.time()))
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _error(self, service: str, status: int, code: str, message: str) -> None:
        payload = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.proxy.record(ProxiedRequest(self.command, self.path, service, status))

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


# ---------------------------------------------------------------- one agent run
@dataclass
class AgentRun:
    """Everything one scenario needs: its AWS resources, fakes, and the running agent."""

    tmp: Path
    aws: Emulator
    imds: FakeImds
    proxy: AwsProxy
    config: AgentConfig
    env: dict[str, str]
    s3: object
    process: subprocess.Popen | None = None
    returncode: int | None = None
    extra: dict = field(default_factory=dict)
    engine: ContainerEngine | None = None  # the docker runtime on a real engine, else the process runtime
    registry_address: str | None = None  # where the ECR host name points (None: the engine's registry)
    started_at: float = 0.0  # time.time() when the agent was started
    agent: AgentObject | None = None  # where the bootstrap downloads the agent (an asset bucket on moto)
    mount_namespace: bool = False  # run the box in its own mount namespace (a fake Mountpoint mounts there)

    def user_data(self) -> str:
        """The user data as the launch template holds it: settings, then the bootstrap."""
        assert self.agent is not None
        return render_user_data(self.config, self.agent)

    @property
    def root(self) -> Path:
        return self.tmp / "root"

    @property
    def calls_file(self) -> Path:
        return self.tmp / "calls.log"

    def start(self) -> AgentRun:
        script = self.tmp / "user-data.sh"
        script.write_text(self.user_data())
        subprocess.run(["bash", "-n", str(script)], check=True)
        argv = ["bash", str(script)]
        if self.engine is not None:
            argv = self.engine.in_namespace(argv, registry_address=self.registry_address)
        if self.mount_namespace:
            argv = ["unshare", "--mount", "--propagation", "private", *argv]
        self.started_at = time.time()
        self.process = subprocess.Popen(
            argv,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    def wait(self, timeout: float = 120) -> AgentRun:
        assert self.process is not None
        try:
            self.returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"agent still running after {timeout}s; setup log:\n{self.setup_log}") from None
        return self

    def run(self, timeout: float = 120) -> AgentRun:
        return self.start().wait(timeout)

    def kill_box(self) -> None:
        """The box dies at once: SIGKILL to every process of the agent's session (the agent, its
        watchers and the trainer each run in their own process group), so nothing finalizes."""
        assert self.process is not None
        while True:  # until the session is empty: a watcher may fork between the listing and the kills
            listed = subprocess.run(
                ["ps", "-o", "pid=,stat=", "-s", str(self.process.pid)], capture_output=True, text=True
            ).stdout.splitlines()
            pids = [int(line.split()[0]) for line in listed if not line.split()[1].startswith("Z")]  # dead already
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.poll()
            time.sleep(0.05)
        self.returncode = self.process.wait()

    def close(self) -> None:
        """Kill the agent if it still runs (no finalize), stop the fake IMDS and the proxy."""
        if self.process is not None and self.process.poll() is None:
            self.kill_box()
        self.imds.stop()
        self.proxy.stop()

    def wait_for_log(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.training_log)
            if found:
                return found
            assert self.process is None or self.process.poll() is None, f"agent ended early:\n{self.setup_log}"
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in the training log after {timeout}s:\n{self.training_log}")

    # what the fakes saw
    @property
    def calls(self) -> list[tuple[float, str]]:
        if not self.calls_file.exists():
            return []
        return [
            (float(line.split(" ", 1)[0]), line.split(" ", 1)[1]) for line in self.calls_file.read_text().splitlines()
        ]

    def called(self, prefix: str) -> list[str]:
        return [call for _, call in self.calls if call.startswith(prefix)]

    def agent_called(self, prefix: str) -> list[str]:
        """`called`, without the user-data bootstrap's own OS deadline (armed before the agent exists)."""
        return [call for call in self.called(prefix) if not call.endswith("training-infra: bootstrap deadline")]

    @property
    def setup_log(self) -> str:
        path = self.root / "var/log/training-setup.log"
        return path.read_text() if path.exists() else ""

    @property
    def training_log(self) -> str:
        path = self.root / "var/log/training.log"
        return path.read_text() if path.exists() else ""

    # what landed in S3
    @property
    def run_id(self) -> str:
        if self.config.run_id:
            return self.config.run_id
        prefixes = self.s3.list_objects_v2(Bucket=self.config.outputs_bucket, Prefix="runs/", Delimiter="/")
        ids = [p["Prefix"].split("/")[1] for p in prefixes.get("CommonPrefixes", []) if p["Prefix"] != "runs/latest/"]
        assert len(ids) == 1, ids
        return ids[0]

    def wait_for_s3(self, prefix: str, timeout: float) -> list[str]:
        """Keys under `prefix` as soon as there are any (empty after `timeout`)."""
        deadline = time.monotonic() + timeout
        while not (found := self.keys(prefix)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.config.outputs_bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, key: str) -> str:
        return self.s3.get_object(Bucket=self.config.outputs_bucket, Key=key)["Body"].read().decode()

    def status(self) -> dict:
        """The run's summary, runs/<id>/status.json (what the CLI reads)."""
        return json.loads(self.read(f"runs/{self.run_id}/status.json"))

    def attempt_status(self, attempt: int = 1) -> dict:
        """One attempt's own record, runs/<id>/attempts/<n>/status.json (what the supervisor reads)."""
        return json.loads(self.read(f"runs/{self.run_id}/attempts/{attempt}/status.json"))

    def log_key(self, name: str = "training.log", attempt: int = 1) -> str:
        return f"runs/{self.run_id}/attempts/{attempt}/logs/{name}"


def _fake_bin(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def new_run(
    aws: Emulator,
    run_dir: Path,
    *,
    env: dict[str, str] | None = None,
    fail_s3_every: int = 0,
    with_image: bool = True,
    with_data: bool = True,
    engine: ContainerEngine | None = None,
    tags: dict[str, str] | None = None,
    **overrides,
) -> AgentRun:
    """A ready, not yet started agent run in `run_dir`; `overrides` are AgentConfig fields, `tags`
    the instance's tags besides `training-infra:managed` (IMDS serves them; `run.imds.set_tag`)."""
    suffix = uuid.uuid4().hex[:10]
    session = boto3.Session(
        region_name=aws.region,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    s3 = session.client("s3", endpoint_url=aws.endpoint)
    data_bucket, outputs_bucket = f"data-{suffix}", f"outputs-{suffix}"
    s3.create_bucket(Bucket=outputs_bucket)
    # As the storage stack makes it: the checkpoint manifest names object versions.
    s3.put_bucket_versioning(Bucket=outputs_bucket, VersioningConfiguration={"Status": "Enabled"})
    if with_data:
        s3.create_bucket(Bucket=data_bucket)
        for file in DATA_DIR.rglob("*.csv"):
            s3.upload_file(str(file), data_bucket, f"data/{file.relative_to(DATA_DIR)}")
    repository = f"trainer-{suffix}"
    ecr = session.client("ecr", endpoint_url=aws.endpoint)
    ecr.create_repository(repositoryName=repository)
    if with_image and engine is not None:
        engine.push_trainer(repository, "v1")
    elif with_image:
        ecr.put_image(repositoryName=repository, imageManifest=MANIFEST, imageTag="v1")
    # What cdk deploy does with the compute construct's file asset: the packed agent in a bucket.
    agent = AgentObject(bucket=f"assets-{suffix}", key=f"{agent_sha256()}.xz", sha256=agent_sha256())
    s3.create_bucket(Bucket=agent.bucket)
    s3.put_object(Bucket=agent.bucket, Key=agent.key, Body=pack_agent())
    log_group = f"/training-infra/{suffix}"
    session.client("logs", endpoint_url=aws.endpoint).create_log_group(logGroupName=log_group)
    sns = session.client("sns", endpoint_url=aws.endpoint)
    sqs = session.client("sqs", endpoint_url=aws.endpoint)
    topic_arn = sns.create_topic(Name=f"alerts-{suffix}")["TopicArn"]
    queue_url = sqs.create_queue(QueueName=f"alerts-{suffix}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)

    bin_dir = run_dir / "bin"
    bin_dir.mkdir(parents=True)
    calls = run_dir / "calls.log"
    (run_dir / "gpu-util").write_text("87\n")
    _fake_bin(bin_dir / "shutdown", f'echo "$(date +%s.%N) shutdown $*" >> {calls}\n')
    _fake_bin(bin_dir / "poweroff", f'echo "$(date +%s.%N) poweroff $*" >> {calls}\n')
    _fake_bin(bin_dir / "nvidia-smi", f"cat {run_dir / 'gpu-util'}\n")

    config = AgentConfig(
        **{
            "data_bucket": data_bucket,
            "outputs_bucket": outputs_bucket,
            "image_uri": f"{ACCOUNT}.dkr.ecr.{aws.region}.amazonaws.com/{repository}",
            "image_tag": "v1",
            # The container runs its image's CMD (the busybox trainer); the process runtime, train.py.
            "training_command": "" if engine else f"{sys.executable} {TRAIN_PY}",
            "region": aws.region,
            "log_group": log_group,
            "alerts_topic_arn": topic_arn,
            "hourly_price_usd": 1.006,
            **overrides,
        }
    )
    imds = FakeImds(instance_id=f"i-{suffix}abcdef0", tags={"training-infra:managed": "true", **(tags or {})}).start()
    proxy = AwsProxy(aws.endpoint, fail_s3_every=fail_s3_every)
    run_env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(run_dir),
        "LANG": "C.UTF-8",
        **aws.env,
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url,
        "TI_ROOT": str(run_dir / "root"),
        "TI_RUNTIME": "docker" if engine else "process",
        **({"TI_DOCKER": str(engine.docker)} if engine else {}),
        "TI_POWEROFF_CMD": str(bin_dir / "poweroff"),
        "TI_SHUTDOWN_BIN": str(bin_dir / "shutdown"),
        "TI_NVIDIA_SMI": str(bin_dir / "nvidia-smi"),
        **(env or {}),
    }
    run = AgentRun(
        tmp=run_dir, aws=aws, imds=imds, proxy=proxy, config=config, env=run_env, s3=s3, engine=engine, agent=agent
    )
    run.extra.update(queue_url=queue_url, sqs=sqs, session=session)
    return run


# ---------------------------------------------------------------- a slow engine and a fake Mountpoint
def fake_docker(run_dir: Path, *, pull_seconds: float, driver: str = "overlay2") -> dict[str, str]:
    """The environment for the `docker` runtime on a stand-in engine (no container runs): `pull`
    takes `pull_seconds` (an image of some size on a slow registry link), `info` reports the storage
    `driver`, `run` is the trainer's first step and exits 0. Each writes its own clock to calls.log
    (`pull-start`, `pull-end`, `first-step`), and `pull` its pid to pull.pid."""
    calls = run_dir / "calls.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    docker = _fake_bin(
        run_dir / "fake-docker",
        f"""echo "$(date +%s.%N) docker $1" >> {calls}
case "$1" in
  info) echo {driver} ;;
  login) cat >/dev/null ;;
  pull) echo $$ > {run_dir / "pull.pid"}; echo "$(date +%s.%N) pull-start" >> {calls}
        sleep {pull_seconds}; echo "$(date +%s.%N) pull-end" >> {calls} ;;
  run) echo "$(date +%s.%N) first-step" >> {calls}; echo "step 1 loss 0.5" ;;
esac
exit 0
""",
    )
    return {"TI_RUNTIME": "docker", "TI_DOCKER": str(docker)}


def fake_mounter(run_dir: Path, *, mounts: bool = True) -> Path:
    """Mountpoint for Amazon S3 played with what this machine has: a tmpfs at the target, the
    bucket's `--prefix` copied in with the AWS CLI (through the same proxy), then remounted read-only;
    `mounts=False` exits 0 having mounted nothing (a mounter that lies). Its argv goes to calls.log.
    The agent must run in its own mount namespace (`unshare -m`), so nothing outlives the run."""
    calls = run_dir / "calls.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    body = f"""echo "$(date +%s.%N) mount-s3 $*" >> {calls}
bucket=$1 target=$2 prefix=""
shift 2
while [ $# -gt 0 ]; do case "$1" in --prefix) prefix=$2; shift 2 ;; *) shift ;; esac; done
"""
    if mounts:
        body += """mount -t tmpfs -o size=64m mountpoint-s3 "$target" || exit 1
aws s3 cp --recursive --only-show-errors "s3://$bucket/$prefix" "$target/" || { umount "$target"; exit 1; }
mount -o remount,ro "$target"
"""
    return _fake_bin(run_dir / "fake-mount-s3", body + "exit 0\n")
