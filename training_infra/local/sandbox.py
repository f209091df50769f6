"""`make local`: the local AWS kept running as a place to work, not only a show.

One process owns everything: the moto server, the deployed stacks, the example image in the
emulator's ECR, and what AWS itself would do after that, which moto does not:
- the supervisor's real handler on the deployed rules: their schedule (`--schedule` to go faster) and
  every EC2 event their patterns match (each state an instance passes through, in order; spot
  warnings), delivered as EventBridge does, retries included (`events.EventDelivery`);
- every managed instance that appears in the emulator played here (`InstancePlayer`), however many
  one fleet made: its real user data under `LocalInstance`, each on its own loopback address with
  its own fake IMDS; an instance terminated by someone else gets its OS shutdown (SIGTERM), as on
  EC2, and is announced once its agent exited;
- after the deploy, a gate: what the stacks declare against what the emulator holds (declared.py).

Other processes reach it through its folder (`.local/sandbox` by default): `state.json` says where
the emulator is and whether it is ready (`training-infra local env` prints its exports); a verb that
needs the sandbox (`local interrupt`) writes `control/<id>.request.json` and reads the answer the
sandbox writes beside it within a second; `local down` sends SIGTERM to the pid in `state.json`.
SIGTERM and Ctrl-C stop the instances (their agents upload logs on the way down), the container
engine and the emulator, then remove the folder (keeping its logs if a line named one). Every child
runs in its own session; `state.json` names each one's process group so that `local down` or the
next `local up` can end them if this process was killed (processes.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
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
from training_infra.local.declared import DeclaredCheck, check_declared
from training_infra.local.emulator import Emulator, EmulatorError
from training_infra.local.events import SPOT_WARNING, DeliveryRule, EventDelivery, ec2_event, rules_from_stack
from training_infra.local.instance import LocalInstance, aws_client
from training_infra.local.processes import ChildProcess, end_all, process_identity

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
SHUTDOWN_SECONDS = STOP_GRACE_SECONDS + 10  # the longest the player waits for an ended instance's agent to exit
RULES_READ_SECONDS = 60  # how often the deployed rules are read again (a `make deploy` may change them)

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
    # Its children's process groups (moto, the registry, each agent), each with its leader's identity: what
    # `local down` and the next `local up` end when the sandbox itself was killed (processes.py).
    children: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, folder: Path) -> SandboxState | None:
        try:
            return cls(**json.loads((folder / "state.json").read_text()))
        except (OSError, json.JSONDecodeError, TypeError):
            return None

    @property
    def child_processes(self) -> list[ChildProcess]:
        return [ChildProcess.load(record) for record in self.children]

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
    if state.phase == "failed":
        raise SandboxError(f"the local AWS in {folder} failed; its logs are kept there until `local down`")
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


def clean_up_after(folder: Path, state: SandboxState) -> list[str]:
    """What a sandbox killed without its clean-up (SIGKILL, a crash) left: its children's process groups ended
    (never a pid since given to another process) and its folder removed (a failed one's kept logs too)."""
    lines = end_all(state.child_processes)
    # Containers run under podman's conmon, which leaves the agent's process group: remove them from the
    # sandbox's own container storage (no other container is in it), which also unmounts their layers.
    docker = folder / "container-engine" / "bin" / "docker"
    if docker.is_file():
        try:
            gone = subprocess.run(
                [str(docker), "rm", "--force", "--all", "--time", "5"], capture_output=True, text=True, timeout=120
            ).stdout.split()
        except (OSError, subprocess.SubprocessError) as error:
            lines.append(f"containers not removed: {error}")
        else:
            lines.extend(f"container {name[:12]} removed" for name in gone)
    shutil.rmtree(folder, ignore_errors=True)
    return lines


def stop_running(
    folder: Path, *, timeout: float = 120, say: Callable[[str], None] | None = None
) -> SandboxState | None:
    """SIGTERM to the sandbox in `folder` and wait until it is gone; None when none was running (what a
    killed one left is cleaned up, each step said to `say`)."""
    state = SandboxState.read(folder)
    if state is None or not state.alive or state.phase == "failed":
        if folder.exists() and state is not None:  # a sandbox killed without its clean-up, or a failed one's logs
            for line in clean_up_after(folder, state):
                (say or log.info)(f"left by the local AWS that was killed (pid {state.pid}): {line}")
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

ENDING_STATES = ("stopping", "stopped", "shutting-down", "terminated")


@dataclass
class PlayedInstance:
    """One managed instance as the player knows it: its box while it runs, the last state it announced."""

    instance_id: str
    run_id: str
    attempt: str
    box: LocalInstance | None = None
    announced: str | None = None  # the last EC2 state EventBridge was told of (None: none yet)
    reclaim_at: float | None = None  # monotonic; set by a spot notice
    stopping: threading.Thread | None = None  # the OS shutdown (the agent's SIGTERM handling) under way
    stopping_since: float = 0.0
    done: bool = False  # its box is gone (stopped or terminated); later states are still announced

    @property
    def agent_running(self) -> bool:
        return self.box is not None and self.box.process is not None and self.box.process.poll() is None


class InstancePlayer:
    """EC2's part: every managed instance in the emulator runs here (its real user data under LocalInstance,
    its own loopback address and IMDS), however many one CreateFleet made; every state it passes through
    becomes an EventBridge event, announced in order. An instance EC2 ends while its agent runs gets its OS
    shutdown (SIGTERM): its states are announced only once the agent has exited (its final upload done),
    bounded by SHUTDOWN_SECONDS, so no reconcile relaunches from an older checkpoint."""

    def __init__(
        self,
        *,
        aws_env: dict[str, str],
        folder: Path,
        events: EventDelivery,
        say: Callable[[str], None],
        engine: ContainerEngine | None = None,
        on_child: Callable[[str, int], None] | None = None,
    ) -> None:
        self.aws_env = aws_env
        self.folder = folder
        self.events = events
        self.say = say
        self.engine = engine
        self.on_child = on_child or (lambda name, pid: None)
        self.ec2 = aws_client("ec2", aws_env)
        self.instances: dict[str, PlayedInstance] = {}

    @property
    def played(self) -> dict[str, PlayedInstance]:
        """The instances whose box is still up."""
        return {i: p for i, p in self.instances.items() if not p.done}

    def _managed(self) -> dict[str, dict[str, Any]]:
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": f"tag:{naming.TAG_MANAGED}", "Values": ["true"]}]
        )
        return {i["InstanceId"]: i for page in pages for r in page["Reservations"] for i in r["Instances"]}

    def shutting_down(self) -> bool:
        """An agent is still on its way down (its final upload): the scheduled reconcile waits for it."""
        return any(p.stopping is not None and not p.done for p in self.instances.values())

    def tick(self) -> None:
        for instance_id, instance in self._managed().items():
            state = instance["State"]["Name"]
            played = self.instances.get(instance_id)
            if played is None:
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                played = PlayedInstance(
                    instance_id, tags.get(naming.TAG_RUN_ID, "?"), tags.get(naming.TAG_ATTEMPT, "?")
                )
                self.instances[instance_id] = played
                if state in ("pending", "running"):
                    self._start(played, instance)
            self._follow(played, state)

    def _follow(self, played: PlayedInstance, state: str) -> None:
        instance_id, box = played.instance_id, played.box
        if state in ENDING_STATES and played.agent_running and not played.done:
            if played.stopping is None:  # EC2's shutdown: the agent's SIGTERM handling uploads on the way down
                self.say(f"{instance_id}: {state} by EC2; the agent gets SIGTERM (its states announced once it exits)")
                played.stopping = threading.Thread(target=box.stop, name=f"stop-{instance_id}", daemon=True)
                played.stopping_since = time.monotonic()
                played.stopping.start()
            if time.monotonic() - played.stopping_since < SHUTDOWN_SECONDS:
                return
            self.say(f"{instance_id}: its agent did not exit within {SHUTDOWN_SECONDS} s; announcing {state}")
        if state in ENDING_STATES and not played.done:
            if played.stopping is not None:
                played.stopping.join(timeout=1)
            if box is not None and played.stopping is None:
                box.stop()  # its IMDS (the agent has exited; a shutdown thread stops both itself)
            played.done = True
        if state != played.announced:
            self.events.state_changes(instance_id, played.announced, state)
            played.announced = state
        if played.done or box is None:
            return
        if box.process is not None and box.process.poll() is not None:
            code = box.process.returncode
            self.say(f"{instance_id} (run {played.run_id}): the agent exited {code}")
            # A power-off terminates the instance (InstanceInitiatedShutdownBehavior); nothing powered it off:
            # on EC2 it would sit idle and bill, so it is terminated here too, and said.
            if not box.powered_off_marker.exists():
                self.say(f"{instance_id}: the agent ended without powering off; terminating it")
            self.ec2.terminate_instances(InstanceIds=[instance_id])
        elif played.reclaim_at is not None and time.monotonic() >= played.reclaim_at:
            self.say(f"{instance_id}: the spot notice ran out: AWS reclaims the instance")
            self.ec2.terminate_instances(InstanceIds=[instance_id])

    def _start(self, played: PlayedInstance, instance: dict[str, Any]) -> None:
        instance_id = instance["InstanceId"]
        box = LocalInstance(instance_id, root=self.folder / instance_id, aws_env=self.aws_env, engine=self.engine)
        played.box = box
        try:
            box.start()
        except Exception as error:  # noqa: BLE001 - the instance fails to boot, the sandbox goes on
            log.exception("%s could not be played", instance_id)
            self.say(f"{instance_id}: could not be played: {error}; terminating it")
            box.stop()
            played.box = None
            self.ec2.terminate_instances(InstanceIds=[instance_id])
            return
        if box.process is not None:
            self.on_child(f"agent {instance_id}", box.process.pid)
        runtime = "docker on podman" if self.engine else "process"
        imds = box.imds.url if box.imds else "?"
        self.say(
            f"{instance_id} (run {played.run_id}, attempt {played.attempt}, {instance['InstanceType']}, "
            f"{box.market}, {box.address}): playing its user data ({runtime} runtime, IMDS {imds})"
        )

    def interrupt(self, run_id: str, node: int | None = None) -> dict[str, Any]:
        """A spot interruption notice to the run's live instances (only gang node `node`'s, given one): IMDS answers
        it, EventBridge sends the warning. AWS sends none to an on-demand instance: refused, in one line."""
        live = [p for p in self.instances.values() if p.run_id == run_id and p.stopping is None and p.agent_running]
        if not live:
            known = sorted({p.run_id for p in self.played.values()})
            playing = f"instances of {', '.join(known)}" if known else "no instance"
            return {"ok": False, "message": f"run {run_id} has no live instance here (the sandbox plays {playing})"}
        if node is not None:  # the node index the supervisor tagged after the fleet returned (a replacement: at launch)
            nodes = {p.instance_id: p.box.tags().get(naming.TAG_NODE, "") for p in live if p.box is not None}
            live = [p for p in live if nodes.get(p.instance_id) == str(node)]
            if not live:
                held = ", ".join(f"{i} node {k or '?'}" for i, k in sorted(nodes.items()))
                return {"ok": False, "message": f"run {run_id} has no live node {node} here (live: {held})"}
        on_demand = [p for p in live if p.box is not None and p.box.market != "spot"]
        if on_demand:
            played = on_demand[0]
            return {
                "ok": False,
                "message": (
                    f"{played.instance_id} (run {run_id}, attempt {played.attempt}) is an on-demand instance: AWS "
                    "sends spot interruption notices only to spot instances; `local interrupt` takes a run on spot"
                ),
            }
        messages = []
        for played in live:
            assert played.box is not None
            played.box.interrupt_spot()
            played.reclaim_at = time.monotonic() + SPOT_NOTICE_SECONDS
            self.events.deliver(
                ec2_event(SPOT_WARNING, played.instance_id, region=self.events.region, account=self.events.account,
                          **{"instance-action": "terminate"})
            )  # fmt: skip
            messages.append(
                f"spot interruption notice sent to {played.instance_id} (run {run_id}, attempt {played.attempt}): "
                f"its agent has {SPOT_NOTICE_SECONDS} s to checkpoint before AWS reclaims it; "
                "the supervisor got the warning and relaunches when it ends"
            )
        return {"ok": True, "message": "\n".join(messages)}

    def stop_all(self) -> None:
        threads = []
        for instance_id, played in list(self.instances.items()):
            if played.box is None or played.done:
                continue
            if played.stopping is not None:  # already on its way down: no second SIGTERM
                threads.append(played.stopping)
                continue
            if played.agent_running:
                self.say(f"{instance_id}: shutting down (its agent uploads logs and status first)")
            thread = threading.Thread(target=played.box.stop, daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(timeout=STOP_GRACE_SECONDS + 10)
        self.instances.clear()


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
        # Each played instance's private address is a loopback one of its own in 127.N (moto_server.py).
        self.emulator = Emulator(self.folder / "emulator", address_block=f"127.{random.randint(10, 99)}")  # noqa: S311
        self.engine: ContainerEngine | None = None
        self.player: InstancePlayer | None = None
        self.events: EventDelivery | None = None
        self.state: SandboxState | None = None
        self._stop = threading.Event()
        self._owner = False  # a refused `up` (another sandbox runs in the folder) must leave it alone
        self._next_reconcile = 0.0
        self._next_rules_read = float("inf")  # set by up(), once the rules are read
        self._log_handler: logging.Handler | None = None
        self.failed = False  # a line named a log: `down` keeps the logs

    @property
    def log_path(self) -> Path:
        """Where tracebacks go (one line on the console names it)."""
        return self.folder / "sandbox.log"

    def record_child(self, name: str, pid: int) -> None:
        """A child process (its own session) for `local down` / `local up` to end should this process be killed."""
        assert self.state is not None
        self.state.children.append(ChildProcess.of(name, pid).dump())
        self.state.write(self.folder)

    def _fail(self, line: str) -> None:
        """A failure line that names a log: the logs outlive `down`."""
        self.failed = True
        self.say(line)

    # ------------------------------------------------------------------ up
    def up(self) -> SandboxState:
        """Everything started, or a SandboxError in one line (what started is stopped by `down`)."""
        try:
            return self._up()
        except SandboxError:
            self.failed = self.failed or self._owner
            raise
        except (EmulatorError, OSError, RuntimeError, subprocess.SubprocessError) as error:
            log.exception("local up failed")
            self.failed = True
            raise SandboxError(f"{error} (details in {self.log_path})") from None

    def _up(self) -> SandboxState:
        started = time.monotonic()
        existing = SandboxState.read(self.folder)
        if existing is not None and existing.alive and existing.phase != "failed":
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
        if existing is not None:  # what a killed sandbox left: its children first, then its folder
            for line in clean_up_after(self.folder, existing):
                self.say(f"left by the local AWS that was killed (pid {existing.pid}): {line}")
        shutil.rmtree(self.folder, ignore_errors=True)
        (self.folder / "control").mkdir(parents=True)
        self._log_handler = logging.FileHandler(self.log_path)
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._log_handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # tracebacks to the file; the console gets one line
        self.state = SandboxState(
            pid=os.getpid(), endpoint="", region=self.emulator.region, runtime=self.runtime,
            schedule_seconds=self.schedule_seconds, phase="starting", started_at=datetime.now(UTC).isoformat(),
            identity=process_identity(os.getpid()),
        )  # fmt: skip
        self.state.write(self.folder)
        self.emulator.start()
        assert self.emulator.pid is not None
        self.record_child("moto", self.emulator.pid)
        self.state.endpoint, self.state.env = self.emulator.endpoint, self.emulator.env
        self.state.write(self.folder)
        os.environ.update(self.emulator.env)  # the CLI code this process runs (supervisor_for) reads it
        self.say(f"local AWS (moto) at {self.emulator.endpoint}; log {self.emulator.log_dir / 'moto.log'}")
        self._deploy()
        self._put_image()
        checking = time.monotonic()
        checked = self.check_declared()
        for line in checked.lines():
            self.say(line)
        log.info("declared vs held: checked in %.1f s", time.monotonic() - checking)
        if not checked.ok:
            raise SandboxError(
                f"the local AWS does not hold what the stacks declare ({len(checked.mismatches)} mismatches above)"
            )
        rules = self._rules()
        self._next_rules_read = time.monotonic() + RULES_READ_SECONDS
        self.events = EventDelivery(
            rules=rules, handler=self._handle, say=self._say_delivery, region=self.emulator.region,
        )  # fmt: skip
        self.say(
            "EventBridge played for the supervisor's rules: "
            + "; ".join(f"{r.name} ({r.schedule or 'pattern'}, {r.retry_attempts} retries)" for r in rules)
        )
        self.player = InstancePlayer(
            aws_env=self.emulator.env, folder=self.folder / "instances", events=self.events, say=self.say,
            engine=self.engine, on_child=self.record_child,
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
            lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
            last = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
            raise SandboxError(
                f"cdk {args[0]} exited {result.returncode}: {last} (all of it in {self.folder / 'cdk.log'})"
            )

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
            if self.engine.registry_pid is not None:
                self.record_child("docker-registry", self.engine.registry_pid)
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

    def check_declared(self) -> DeclaredCheck:
        """What the stacks declare against what the emulator holds (training_infra/local/declared.py)."""
        return check_declared(self.client)

    def _rules(self) -> list[DeliveryRule]:
        rules = rules_from_stack(self.client("cloudformation"), self.client("events"), naming.COMPUTE_STACK)
        if not any(rule.pattern for rule in rules) or not any(rule.schedule for rule in rules):
            raise SandboxError(f"{naming.COMPUTE_STACK} deploys no EventBridge rule that targets the supervisor")
        return rules

    def _handle(self, event: dict[str, Any]) -> Any:
        """The supervisor's handler as its Lambda runs it; made for each event: a `make deploy` meanwhile may
        have changed the stack's limits."""
        from training_infra.cli.aws import Aws
        from training_infra.cli.launching import supervisor_for

        return supervisor_for(Aws(self.emulator.region)).handle(event)

    def _say_delivery(self, line: str) -> None:
        if "failed" in line and "dropped" in line:
            self._fail(f"{line} (traceback in {self.log_path})")
        else:
            self.say(line)

    # ------------------------------------------------------------------ running
    def tick(self) -> None:
        assert self.player is not None and self.events is not None
        now = time.monotonic()
        # The schedule (EventBridge's rate, or --schedule) waits while an ended instance's agent still uploads.
        if now >= self._next_reconcile and not self.player.shutting_down():
            self._next_reconcile = now + self.schedule_seconds
            if now >= self._next_rules_read:  # a `make deploy` meanwhile may have changed the rules
                self._next_rules_read = now + RULES_READ_SECONDS
                self.events.rules = self._rules()
            self.events.scheduled()
        self.player.tick()
        self._answer_requests()

    def _answer_requests(self) -> None:
        assert self.player is not None
        for request_file in sorted((self.folder / "control").glob("*.request.json")):
            try:
                request = json.loads(request_file.read_text())
                if request.get("verb") == "interrupt":
                    node = request.get("node")
                    answer = self.player.interrupt(str(request.get("run", "")), None if node is None else int(node))
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
                    log.exception("tick failed")
                    self._fail(f"tick failed: {error} (traceback in {self.log_path}; the next tick retries)")
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
            if self._log_handler is not None:
                log.removeHandler(self._log_handler)
                self._log_handler.close()
                log.propagate = True
            if self.failed and self.state is not None:
                self.state.phase = "failed"
                self.state.write(self.folder)
            _remove(self.folder, keep_logs=self.failed)
        if self.failed:
            self.say(
                f"local AWS stopped; its logs kept in {self.folder} (the next `local up` or `local down` removes them)"
            )
        else:
            self.say(f"local AWS stopped; {self.folder} removed")


def _remove(folder: Path, *, keep_logs: bool) -> None:
    """The folder gone; with `keep_logs`, its `*.log` files and state.json (phase `failed`) stay, so the line that
    named a log can still be followed (the next `local up` or `local down` removes them)."""
    if not keep_logs:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_symlink() or path.is_file():
            if path.suffix != ".log" and path.name != "state.json":
                path.unlink(missing_ok=True)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


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
