"""`make local`: the local AWS kept running as a place to work, not only a show.

One process owns everything: the moto server, the deployed stacks, the example image in the
emulator's ECR, and what AWS itself would do after that, which moto does not:
- the supervisor's real handler on its schedule (EventBridge's one-minute rule; `--schedule` to go
  faster), and EC2's events (state changes, spot warnings) handed to it as EventBridge delivers
  them (`EventDelivery`);
- every managed instance that appears in the emulator played here (`InstancePlayer`): its real
  user data under `LocalInstance`, each with its own fake IMDS and private address; an instance
  terminated by someone else gets its OS shutdown (SIGTERM), as on EC2.

Other processes reach it through its folder (`.local/sandbox` by default): `state.json` says where
the emulator is and whether it is ready (`training-infra local env` prints its exports); a verb that
needs the sandbox (`local interrupt`) writes `control/<id>.request.json` and reads the answer the
sandbox writes beside it within a second; `local down` sends SIGTERM to the pid in `state.json`.
SIGTERM and Ctrl-C stop the instances (their agents upload logs on the way down), the container
engine and the emulator, then remove the folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training_infra import naming
from training_infra.local.containers import ContainerEngine
from training_infra.local.emulator import Emulator
from training_infra.local.events import SCHEDULED, SPOT_WARNING, STATE_CHANGE, ec2_event
from training_infra.local.instance import LocalInstance, aws_client

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / ".local" / "sandbox"
# Set by `local env`: the sandbox those exports point at (and `make deploy` adds the emulator's flags).
DIR_VARIABLE = "TRAINING_INFRA_LOCAL"
CDK = ROOT / "node_modules" / ".bin" / "cdk"
# moto ships this image id; the emulator cannot resolve the Deep Learning AMI's public SSM parameter.
LOCAL_AMI = "ami-12c6146b"
# The emulator's CloudFormation: changes sets are not reliable there, and no previous parameters exist.
DEPLOY_FLAGS = ("--method=direct", "--no-previous-parameters")
CONTEXT_FLAGS = ("-c", f"image_id={LOCAL_AMI}")
# What the process runtime's launch needs in ECR: a tag to find (it runs --command, no image).
STAND_IN_MANIFEST = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {},
    "layers": [],
}
TICK_SECONDS = 1.0  # how often instances and control requests are looked at
SPOT_NOTICE_SECONDS = 120  # AWS reclaims the instance this long after its notice
STOP_GRACE_SECONDS = 30
# Accepted by moto, reported CREATE_COMPLETE, never enforced (proven by template assertions instead).
NOT_EMULATED = "Budgets, alarm actions, S3 lifecycle rules and public-access blocks, the IAM OIDC provider"

log = logging.getLogger("training_infra.local")


class SandboxError(RuntimeError):
    """One line for the user; nothing is left running."""


@dataclass
class SandboxState:
    """`state.json`: what other processes know of the running sandbox."""

    pid: int
    endpoint: str
    region: str
    runtime: str
    schedule_seconds: float
    phase: str  # starting, ready, stopping
    started_at: str
    ready_seconds: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Which process `pid` is: after a reboot or a long time the number may belong to another one.
    identity: str = ""

    @classmethod
    def read(cls, folder: Path) -> SandboxState | None:
        try:
            return cls(**json.loads((folder / "state.json").read_text()))
        except (OSError, json.JSONDecodeError, TypeError):
            return None

    def write(self, folder: Path) -> None:
        temporary = folder / "state.json.tmp"
        temporary.write_text(json.dumps(asdict(self), indent=2))
        temporary.replace(folder / "state.json")

    @property
    def alive(self) -> bool:
        """The sandbox's own process exists and is not a zombie (one its starter has not reaped yet): the
        same boot and start time, so a reused pid (a reboot, a long time) is never taken for it, nor sent
        `local down`'s SIGTERM."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        except OSError:
            return True
        fields = stat.rsplit(")", 1)[-1].split()
        return fields[0] != "Z" and process_identity(self.pid) == self.identity


def process_identity(pid: int) -> str:
    """`<boot id>:<start time in clock ticks>`: unique to one process across pid reuse and reboots."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return ""
    return f"{boot}:{started}"


def serves(endpoint: str, folder: Path | None = None) -> bool:
    """True only when a live, ready sandbox (in `folder`, $TRAINING_INFRA_LOCAL or the default folder) answers
    at exactly `endpoint`: what `make deploy` asks before it adds the emulator's flags, so a loopback proxy,
    an SSH tunnel to a VPC endpoint or exports left over after `local down` never get them on real AWS."""
    if not endpoint:
        return False
    folder = folder or Path(os.environ.get(DIR_VARIABLE) or DEFAULT_DIR)
    state = SandboxState.read(folder)
    return state is not None and state.phase == "ready" and state.alive and state.endpoint == endpoint.rstrip("/")


def running_state(folder: Path) -> SandboxState:
    """The ready sandbox in `folder`, or a one-line SandboxError saying why there is none."""
    state = SandboxState.read(folder)
    if state is None:
        raise SandboxError(f"no local AWS is running in {folder}: start one with `make local`")
    if not state.alive:
        raise SandboxError(f"the local AWS in {folder} (pid {state.pid}) is gone: `make local` starts a new one")
    if state.phase == "starting":
        raise SandboxError(f"the local AWS in {folder} is still starting (deploying the stacks); try again shortly")
    if state.phase == "stopping":
        raise SandboxError(f"the local AWS in {folder} is stopping")
    return state


def wait_ready(folder: Path, process: subprocess.Popen | None = None, timeout: float = 600) -> SandboxState:
    """Until `folder`'s sandbox is ready (or its process ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = SandboxState.read(folder)
        if state is not None and state.phase == "ready":
            return state
        if process is not None and process.poll() is not None:
            raise SandboxError(f"`training-infra local up` exited {process.returncode} before it was ready")
        time.sleep(0.3)
    raise SandboxError(f"the local AWS in {folder} was not ready within {timeout:.0f} s")


def ask(folder: Path, request: dict[str, Any], *, timeout: float = 15) -> dict[str, Any]:
    """A request to the running sandbox through its control folder; its answer (`ok`, `message`)."""
    state = running_state(folder)
    control = folder / "control"
    name = uuid.uuid4().hex
    temporary = control / f"{name}.tmp"
    temporary.write_text(json.dumps(request))
    temporary.replace(control / f"{name}.request.json")
    answer = control / f"{name}.answer.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer.exists():
            result = json.loads(answer.read_text())
            answer.unlink(missing_ok=True)
            return result
        if not state.alive:
            break
        time.sleep(0.1)
    (control / f"{name}.request.json").unlink(missing_ok=True)
    raise SandboxError(f"the local AWS (pid {state.pid}) did not answer within {timeout:.0f} s")


def stop_running(folder: Path, *, timeout: float = 120) -> SandboxState | None:
    """SIGTERM to the sandbox in `folder` and wait until it is gone; None when none was running."""
    state = SandboxState.read(folder)
    if state is None or not state.alive:
        if folder.exists() and state is not None:  # a sandbox killed without its clean-up
            shutil.rmtree(folder, ignore_errors=True)
        return None
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and state.alive:
        time.sleep(0.2)
    if state.alive:
        raise SandboxError(f"the local AWS (pid {state.pid}) did not stop within {timeout:.0f} s")
    return state


# ---------------------------------------------------------------------------------------------
# What AWS does after the deploy


class EventDelivery:
    """EventBridge's part: the supervisor's real handler gets each event, in this process, as its
    Lambda would (a failed delivery is logged; AWS retries an asynchronous invoke twice)."""

    def __init__(self, region: str, say: Callable[[str], None]) -> None:
        self.region = region
        self.say = say
        self.delivered: list[dict[str, Any]] = []
        self._last_reconcile = ""

    def _supervisor(self) -> Any:
        # Made for each event: a `make deploy` meanwhile may have changed the stack's limits.
        from training_infra.cli.aws import Aws
        from training_infra.cli.launching import supervisor_for

        return supervisor_for(Aws(self.region))

    def deliver(self, event: dict[str, Any]) -> dict[str, Any] | None:
        self.delivered.append(event)
        what = event["detail-type"]
        detail = event.get("detail") or {}
        if detail:
            what += f" {detail.get('instance-id')}" + (f" {detail['state']}" if "state" in detail else "")
        try:
            result = self._supervisor().handle(event)
        except Exception as error:  # noqa: BLE001 - one event's failure must not end the sandbox
            self.say(f"supervisor <- {what}: failed: {error}")
            log.exception("supervisor failed on %s", what)
            return None
        text = json.dumps(result, default=str)
        if event["detail-type"] == SCHEDULED:  # a line only when the reconcile found something new
            if text == self._last_reconcile:
                return result
            self._last_reconcile = text
        self.say(f"supervisor <- {what}: {text}")
        return result


@dataclass
class PlayedInstance:
    box: LocalInstance
    run_id: str
    attempt: str
    reclaim_at: float | None = None  # monotonic; set by a spot notice
    stopping: threading.Thread | None = None


class InstancePlayer:
    """EC2's part: every managed instance in the emulator runs here (its real user data under
    LocalInstance, its own fake IMDS); its state changes become EventBridge events."""

    def __init__(
        self,
        *,
        aws_env: dict[str, str],
        folder: Path,
        events: EventDelivery,
        say: Callable[[str], None],
        engine: ContainerEngine | None = None,
    ) -> None:
        self.aws_env = aws_env
        self.folder = folder
        self.events = events
        self.say = say
        self.engine = engine
        self.ec2 = aws_client("ec2", aws_env)
        self.played: dict[str, PlayedInstance] = {}
        self.finished: set[str] = set()

    def _managed(self) -> dict[str, dict[str, Any]]:
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": f"tag:{naming.TAG_MANAGED}", "Values": ["true"]}]
        )
        return {i["InstanceId"]: i for page in pages for r in page["Reservations"] for i in r["Instances"]}

    def tick(self) -> None:
        instances = self._managed()
        for instance_id, instance in instances.items():
            state = instance["State"]["Name"]
            if instance_id in self.finished:
                continue
            if instance_id not in self.played:
                if state in ("pending", "running"):
                    self._start(instance)
                continue
            played = self.played[instance_id]
            box = played.box
            if state in ("shutting-down", "terminated", "stopping", "stopped"):
                self._end(instance_id, played, state)
            elif box.process is not None and box.process.poll() is not None:
                code = box.wait(timeout=1)  # a power-off terminates the instance, as on EC2
                self.say(f"{instance_id} (run {played.run_id}): the agent exited {code}")
                if not box.powered_off_marker.exists():  # nothing powers it off: on EC2 it would sit idle
                    self.ec2.terminate_instances(InstanceIds=[instance_id])
            elif played.reclaim_at is not None and time.monotonic() >= played.reclaim_at:
                self.say(f"{instance_id}: the spot notice ran out: AWS reclaims the instance")
                self.ec2.terminate_instances(InstanceIds=[instance_id])

    def _start(self, instance: dict[str, Any]) -> None:
        instance_id = instance["InstanceId"]
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        box = LocalInstance(instance_id, root=self.folder / instance_id, aws_env=self.aws_env, engine=self.engine)
        played = PlayedInstance(box, tags.get(naming.TAG_RUN_ID, "?"), tags.get(naming.TAG_ATTEMPT, "?"))
        self.played[instance_id] = played
        try:
            box.start()
        except Exception as error:  # noqa: BLE001 - the instance fails to boot, the sandbox goes on
            self.say(f"{instance_id}: could not be played: {error}")
            self.finished.add(instance_id)
            self.ec2.terminate_instances(InstanceIds=[instance_id])
            return
        address = instance.get("PrivateIpAddress", "?")
        runtime = "docker on podman" if self.engine else "process"
        self.say(
            f"{instance_id} (run {played.run_id}, attempt {played.attempt}, {instance['InstanceType']}, "
            f"{address}): playing its user data ({runtime} runtime, IMDS {box.imds.url if box.imds else '?'})"
        )
        self.events.deliver(ec2_event(STATE_CHANGE, instance_id, region=self.events.region, state="running"))

    def _end(self, instance_id: str, played: PlayedInstance, state: str) -> None:
        box = played.box
        if box.process is not None and box.process.poll() is None:
            if played.stopping is None:  # EC2's shutdown: the agent's SIGTERM handling uploads on the way down
                self.say(f"{instance_id}: {state} by EC2; the agent gets SIGTERM")
                played.stopping = threading.Thread(target=box.stop, name=f"stop-{instance_id}", daemon=True)
                played.stopping.start()
            return
        box.stop()  # its IMDS
        self.finished.add(instance_id)
        del self.played[instance_id]
        if state in ("terminated", "stopped"):  # the states EventBridge's rule matches (a stopped box still bills)
            self.events.deliver(ec2_event(STATE_CHANGE, instance_id, region=self.events.region, state=state))

    def interrupt(self, run_id: str) -> dict[str, Any]:
        """A spot interruption notice to the run's live instance: IMDS answers it, EventBridge sends the warning."""
        live = [(i, p) for i, p in self.played.items() if p.run_id == run_id and p.stopping is None]
        if not live:
            known = sorted({p.run_id for p in self.played.values()})
            playing = f"instances of {', '.join(known)}" if known else "no instance"
            return {"ok": False, "message": f"run {run_id} has no live instance here (the sandbox plays {playing})"}
        messages = []
        for instance_id, played in live:
            if played.box.imds is None:
                continue
            played.box.interrupt_spot()
            played.reclaim_at = time.monotonic() + SPOT_NOTICE_SECONDS
            event = ec2_event(SPOT_WARNING, instance_id, region=self.events.region, **{"instance-action": "terminate"})
            self.events.deliver(event)
            messages.append(
                f"spot interruption notice sent to {instance_id} (run {run_id}, attempt {played.attempt}): "
                f"its agent has {SPOT_NOTICE_SECONDS} s to checkpoint before AWS reclaims it; "
                "the supervisor got the warning and relaunches when it ends"
            )
        return {"ok": True, "message": "\n".join(messages)}

    def stop_all(self) -> None:
        threads = []
        for instance_id, played in list(self.played.items()):
            if played.box.process is not None and played.box.process.poll() is None:
                self.say(f"{instance_id}: shutting down (its agent uploads logs and status first)")
            thread = threading.Thread(target=played.box.stop, daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(timeout=STOP_GRACE_SECONDS + 10)
        self.played.clear()


# ---------------------------------------------------------------------------------------------
# The sandbox


class Sandbox:
    """`Sandbox(folder=...).run()` until SIGTERM or Ctrl-C; `up()` alone for a caller that drives `tick()`."""

    def __init__(
        self,
        *,
        folder: Path = DEFAULT_DIR,
        runtime: str = "process",
        schedule_seconds: float = 60,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.runtime = runtime
        self.schedule_seconds = schedule_seconds
        self.say = say or (lambda line: print(line, flush=True))
        self.emulator = Emulator(self.folder / "emulator")
        self.engine: ContainerEngine | None = None
        self.player: InstancePlayer | None = None
        self.events: EventDelivery | None = None
        self.state: SandboxState | None = None
        self._stop = threading.Event()
        self._owner = False  # a refused `up` (another sandbox runs in the folder) must leave it alone
        self._next_reconcile = 0.0

    # ------------------------------------------------------------------ up
    def up(self) -> SandboxState:
        started = time.monotonic()
        existing = SandboxState.read(self.folder)
        if existing is not None and existing.alive:
            raise SandboxError(
                f"a local AWS is already running in {self.folder} (pid {existing.pid}): "
                "`training-infra local down` first, or `--dir` for another"
            )
        if self.folder.exists() and (not self.folder.is_dir() or (any(self.folder.iterdir()) and existing is None)):
            raise SandboxError(
                f"--dir {self.folder}: exists and is not a local AWS's folder (no state.json); "
                "give a new or empty folder (`local down` removes it)"
            )
        self._owner = True  # from here on, the folder and all in it are this sandbox's to remove
        if self.folder.exists():
            shutil.rmtree(self.folder)  # what a killed sandbox left
        (self.folder / "control").mkdir(parents=True)
        self.state = SandboxState(
            pid=os.getpid(), endpoint="", region=self.emulator.region, runtime=self.runtime,
            schedule_seconds=self.schedule_seconds, phase="starting", started_at=datetime.now(UTC).isoformat(),
            identity=process_identity(os.getpid()),
        )  # fmt: skip
        self.state.write(self.folder)
        self.emulator.start()
        self.state.endpoint, self.state.env = self.emulator.endpoint, self.emulator.env
        self.state.write(self.folder)
        os.environ.update(self.emulator.env)  # the CLI code this process runs (supervisor_for) reads it
        self.say(f"local AWS (moto) at {self.emulator.endpoint}; log {self.emulator.log_dir / 'moto.log'}")
        self._deploy()
        self._put_image()
        for line in self.check_declared():
            self.say(line)
        self.events = EventDelivery(self.emulator.region, self.say)
        self.player = InstancePlayer(
            aws_env=self.emulator.env, folder=self.folder / "instances", events=self.events, say=self.say,
            engine=self.engine,
        )  # fmt: skip
        self.state.phase, self.state.ready_seconds = "ready", round(time.monotonic() - started, 1)
        self.state.write(self.folder)
        return self.state

    def _cdk(self, *args: str) -> None:
        # cdk.json's `python3 app.py` and the CDK's node: this venv's and the pinned Node, as `make` puts them.
        tools = [str(Path(sys.executable).parent), str(ROOT / ".venv" / "nodejs" / "bin"), os.environ["PATH"]]
        path = os.pathsep.join(tools)
        env = {
            **os.environ, **self.emulator.env, "PATH": path,
            "CDK_DISABLE_VERSION_CHECK": "true", "CDK_DISABLE_CLI_TELEMETRY": "true",
        }  # fmt: skip
        argv = [str(CDK), *args, "--no-notices", "--output", str(self.folder / "cdk.out")]
        result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
        (self.folder / "cdk.log").open("a").write(result.stdout + result.stderr)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
            raise SandboxError(f"cdk {args[0]} exited {result.returncode}:\n{tail}")

    def _deploy(self) -> None:
        started = time.monotonic()
        self._cdk("bootstrap", f"aws://123456789012/{self.emulator.region}")
        self._cdk("deploy", "--all", *DEPLOY_FLAGS, "--require-approval", "never", *CONTEXT_FLAGS)
        self.say(f"cdk bootstrap + deploy of the four stacks: {time.monotonic() - started:.0f} s (real CDK CLI)")

    def client(self, service: str) -> Any:
        return aws_client(service, self.emulator.env)

    def output(self, key: str, stack: str = naming.COMPUTE_STACK) -> str:
        from training_infra.cli.aws import output_key_for

        described = self.client("cloudformation").describe_stacks()["Stacks"]
        wanted = output_key_for(key) if not key[0].isupper() else key
        for found in described:
            for output in found.get("Outputs", []):
                if output["OutputKey"] == wanted:
                    return output["OutputValue"]
        raise SandboxError(f"no stack output {wanted}")

    def _put_image(self) -> None:
        """ECR is two services: its API (the emulator's, which `launch` asks whether the tag exists) and its
        registry. A push on AWS updates both; here the manifest the local registry holds (docker runtime),
        or a stand-in one the process runtime does not need, goes into the emulator's ECR."""
        uri = self.output("ecr_repository_uri")
        repository = uri.rsplit("/", 1)[-1]
        if self.runtime == "docker":
            host = uri.split("/", 1)[0]
            account, _, _, region = host.split(".")[:4]
            self.engine = ContainerEngine(self.folder / "container-engine", account=account, region=region)
            self.engine.start()
            self.say(f"podman + docker-registry at {self.engine.registry_address}:80 answering as {host}")
            self.say("podman build examples/trainer (about a minute the first time: numpy from PyPI)")
            try:
                image = self.engine.build_example_trainer()
            except subprocess.CalledProcessError as error:
                raise SandboxError(f"podman build exited {error.returncode}: {error.stderr.strip()[-300:]}") from None
            self.engine.push_trainer(repository, "latest", image=image)
            manifest, what = self.engine.manifest(repository, "latest"), "the example trainer built on podman"
        else:
            manifest, what = json.dumps(STAND_IN_MANIFEST), "a stand-in manifest (the process runtime needs no image)"
        self.client("ecr").put_image(repositoryName=repository, imageManifest=manifest, imageTag="latest")
        self.say(f"ECR {repository}:latest: {what}")

    def check_declared(self) -> list[str]:
        """What the stacks declare against what the emulator holds: each bucket's versioning and default
        encryption (moto's CloudFormation skips versioning). What it skipped is applied here, in one line."""
        applied, cloudformation, s3 = [], self.client("cloudformation"), self.client("s3")
        for stack in (naming.STORAGE_STACK, naming.REGISTRY_STACK, naming.SAFETY_STACK, naming.COMPUTE_STACK):
            body = cloudformation.get_template(StackName=stack)["TemplateBody"]
            template = json.loads(body) if isinstance(body, str) else body
            physical = {
                r["LogicalResourceId"]: r.get("PhysicalResourceId", "")
                for page in cloudformation.get_paginator("list_stack_resources").paginate(StackName=stack)
                for r in page["StackResourceSummaries"]
            }
            for logical, resource in template.get("Resources", {}).items():
                if resource.get("Type") != "AWS::S3::Bucket" or not physical.get(logical):
                    continue
                bucket, properties = physical[logical], resource.get("Properties", {})
                declared = (properties.get("VersioningConfiguration") or {}).get("Status")
                if declared and s3.get_bucket_versioning(Bucket=bucket).get("Status") != declared:
                    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": declared})
                    applied.append(f"{logical} versioning")
                encryption = properties.get("BucketEncryption", {}).get("ServerSideEncryptionConfiguration")
                if encryption and not _has_encryption(s3, bucket):
                    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": encryption})
                    applied.append(f"{logical} encryption")
        lines = []
        if applied:
            lines.append(f"applied what moto's CloudFormation skipped: {', '.join(applied)}")
        lines.append(f"declared and held match; not emulated (template assertions prove them): {NOT_EMULATED}")
        return lines

    # ------------------------------------------------------------------ running
    def tick(self) -> None:
        assert self.player is not None and self.events is not None
        now = time.monotonic()
        if now >= self._next_reconcile:
            self._next_reconcile = now + self.schedule_seconds
            self.events.deliver(ec2_event(SCHEDULED, region=self.emulator.region))
        self.player.tick()
        self._answer_requests()

    def _answer_requests(self) -> None:
        assert self.player is not None
        for request_file in sorted((self.folder / "control").glob("*.request.json")):
            try:
                request = json.loads(request_file.read_text())
                if request.get("verb") == "interrupt":
                    answer = self.player.interrupt(str(request.get("run", "")))
                else:
                    answer = {"ok": False, "message": f"unknown request {request.get('verb')!r}"}
            except Exception as error:  # noqa: BLE001 - the asker gets the one line
                answer = {"ok": False, "message": str(error)}
            temporary = request_file.with_suffix(".tmp")
            temporary.write_text(json.dumps(answer))
            temporary.replace(request_file.with_name(request_file.name.replace(".request.", ".answer.")))
            request_file.unlink(missing_ok=True)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> int:
        """Up, then tick until SIGTERM or Ctrl-C; down in every case."""
        # Handlers for both, not Python's KeyboardInterrupt: a shell's background job starts with SIGINT ignored.
        previous = {
            number: signal.signal(number, self.request_stop)
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        try:
            state = self.up()
            self.say(
                f'ready in {state.ready_seconds:.0f} s. In another shell: eval "$(training-infra local env)"; '
                f"`training-infra local down` or Ctrl-C stops everything"
            )
            self.say(
                f"supervisor every {self.schedule_seconds:g} s; EC2 events delivered as they happen; "
                f"instances played with the {self.runtime} runtime"
            )
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception as error:  # noqa: BLE001 - e.g. the emulator busy: the next tick retries
                    self.say(f"tick failed: {error}")
                    log.exception("tick failed")
                self._stop.wait(TICK_SECONDS)
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one down, even if asked twice
            self.down()
            for number, handler in previous.items():
                signal.signal(number, handler)

    def down(self) -> None:
        if not self._owner:
            return
        if self.state is not None and SandboxState.read(self.folder) is not None:
            self.state.phase = "stopping"
            self.state.write(self.folder)
        with _quiet_interrupts():
            if self.player is not None:
                self.player.stop_all()
            if self.engine is not None:
                self.engine.stop()
                self.engine = None
            self.emulator.stop()
            shutil.rmtree(self.folder, ignore_errors=True)
        self.say(f"local AWS stopped; {self.folder} removed")


def _has_encryption(s3: Any, bucket: str) -> bool:
    try:
        s3.get_bucket_encryption(Bucket=bucket)
    except s3.exceptions.ClientError:
        return False
    return True


@contextlib.contextmanager
def _quiet_interrupts() -> Iterator[None]:
    """A second Ctrl-C during the clean-up must not leave it half done."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:  # `python -m training_infra.local.sandbox`, as `local up`
    import argparse

    parser = argparse.ArgumentParser(prog="training-infra local up")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--runtime", choices=("process", "docker"), default="process")
    parser.add_argument("--schedule", type=float, default=60)
    args = parser.parse_args(argv)
    return Sandbox(folder=args.dir, runtime=args.runtime, schedule_seconds=args.schedule).run()


if __name__ == "__main__":
    sys.exit(main())
