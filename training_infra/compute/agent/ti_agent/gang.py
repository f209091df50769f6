"""Multi-node runs (issue 25): this node's place in the gang, the torchrun launch, the trainer's whole
process tree, the NCCL-uses-EFA check and the checkpoints that are complete across nodes.

The supervisor tags every member (docs/agent.md, "Multi-node runs"): `training-infra:nodes` = N at
launch, then `training-infra:node` = k and `training-infra:rendezvous` = node 0's address:29400 once
the fleet returned. The engine is PyTorch's own: torchrun with the c10d rendezvous on node 0, DCP
checkpoints; this module only hands them what they need. Standard library only: it runs on the box.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from . import imds_block, torchrun
from .aws import Aws, AwsError
from .checkpoints import AttemptFailed, RunCheckpointPaths, SyncState, include_filters
from .imds_block import ImdsBlock
from .paths import UnsafePath, safe_join
from .status import Outcome
from .torchrun import Launch
from .watchers import Watcher

if TYPE_CHECKING:
    from .agent import Agent

TAG = "training-infra"
RDZV_PORT = 29400
TAG_POLL_SECONDS = 2.0
STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = re.compile(r"^\.node-(\d+)\.done$")
METADATA = ".metadata"  # DCP's own index of a checkpoint, written by the coordinator once every rank wrote
SMALL_FILE_BYTES = 64 * 1048576  # up to this, one PutObject from the agent's process; above, the AWS CLI's multipart
TRAINER_TOKEN = "TI_TRAINER_TOKEN"  # noqa: S105 - a variable name, not a secret; in the environment of every process the trainer starts


class GangError(AttemptFailed):
    """The gang's tags are missing or wrong: the attempt fails with this one line."""


# ---------------------------------------------------------------- this node's place
# The survivors' rendezvous waits this long beyond the supervisor's own bound (the replacement `running` within
# gang_replace_seconds) plus the replacement's image pull (bounded by its pull timeout): its boot to the agent,
# its checkpoint restore and torchrun's start.
JOIN_MARGIN_SECONDS = 300


def join_timeout_seconds(replace_seconds: int, pull_timeout_seconds: int) -> int:
    """How long a survivor's torchrun waits in the rendezvous for a lost node's replacement (c10d's join_timeout).

    The supervisor waits up to `replace_seconds` (the stack's gang_replace_timeout_minutes, TI_GANG_REPLACE_SECONDS)
    for the replacement to be running; then it boots, pulls the image (at most `pull_timeout_seconds`, after which
    its agent fails it and the supervisor ends the gang) and restores. A survivor that gave up sooner would end the
    gang as its own failure while the replacement was still on time."""
    return replace_seconds + pull_timeout_seconds + JOIN_MARGIN_SECONDS


@dataclass(frozen=True)
class Member:
    """Node `node` of `nodes`, meeting the others at `rendezvous` (host:port) for attempt `attempt`; torchrun
    waits up to `join_timeout` seconds in a rendezvous round (for a lost node's replacement)."""

    nodes: int
    node: int
    rendezvous: str
    run_id: str
    attempt: int
    join_timeout: int = join_timeout_seconds(600, 1800)  # the settings' defaults; join() derives it from the run's

    @property
    def rdzv_conf(self) -> str:
        return f"is_host={'true' if self.is_host else 'false'},join_timeout={self.join_timeout}"

    @property
    def rdzv_id(self) -> str:
        return f"{self.run_id}-{self.attempt}"

    @property
    def is_host(self) -> bool:
        return self.node == 0


def gang_size(tags: Mapping[str, str]) -> int:
    """N from `training-infra:nodes`; 1 when the tag is absent (a single-node run, as before)."""
    raw = tags.get(f"{TAG}:nodes")
    if raw is None:
        return 1
    if not re.fullmatch(r"[1-9][0-9]{0,3}", raw):
        raise GangError(f"tag {TAG}:nodes='{raw}' is not allowed: use a whole number from 1")
    return int(raw)


def member_from_tags(tags: Mapping[str, str], *, run_id: str, attempt: int) -> Member | None:
    """The member once both `node` and `rendezvous` are there (None: not yet); GangError when one is wrong."""
    nodes = gang_size(tags)
    node, rendezvous = tags.get(f"{TAG}:node"), tags.get(f"{TAG}:rendezvous")
    if node is None or rendezvous is None:
        return None
    if not re.fullmatch(r"[0-9]{1,4}", node) or int(node) >= nodes:
        raise GangError(f"tag {TAG}:node='{node}' is not allowed: use a whole number from 0 to {nodes - 1}")
    found = re.fullmatch(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):([0-9]{1,5})", rendezvous)
    if not found or not 0 < int(found.group(2)) < 65536:
        raise GangError(f"tag {TAG}:rendezvous='{rendezvous}' is not allowed: use HOST:PORT (node 0's address:29400)")
    return Member(nodes=nodes, node=int(node), rendezvous=rendezvous, run_id=run_id, attempt=attempt)


def wait_for_member(
    read_tags: Callable[[], Mapping[str, str]],
    *,
    run_id: str,
    attempt: int,
    wait_seconds: float,
    poll_seconds: float = TAG_POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Member:
    """Poll the tags until the supervisor set this node's index and the rendezvous (bounded)."""
    until = clock() + wait_seconds
    while True:
        member = member_from_tags(read_tags(), run_id=run_id, attempt=attempt)
        if member is not None:
            return member
        if clock() >= until:
            raise GangError(
                f"tags {TAG}:node and {TAG}:rendezvous not set within {wait_seconds:g}s"
                " (TI_RENDEZVOUS_WAIT_SECONDS): the supervisor never placed this node in the gang"
            )
        sleep(poll_seconds)


# ---------------------------------------------------------------- the launch
def trainer_env(member: Member, nproc: int, *, nccl_debug: bool) -> dict[str, str]:
    """TI_* for the trainer, PET_* for torchrun (each of its flags reads PET_<FLAG> when not given)."""
    env = {
        "TI_NODES": str(member.nodes),
        "TI_NODE_RANK": str(member.node),
        "TI_RDZV_ENDPOINT": member.rendezvous,
        "TI_RDZV_ID": member.rdzv_id,
        "PET_NNODES": str(member.nodes),
        "PET_NPROC_PER_NODE": str(nproc),
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": member.rendezvous,
        "PET_RDZV_ID": member.rdzv_id,
        "PET_RDZV_CONF": member.rdzv_conf,
        # A lost peer fails the survivors' workers; torchrun restarts them into the next rendezvous round.
        "PET_MAX_RESTARTS": "100",
        # Without it a replacement node deadlocks joining the store the workers share (pytorch#135712).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    if nccl_debug:
        env.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET")
    return env


def plan_for(command: str, nodes: int) -> torchrun.Plan:
    try:
        return torchrun.plan(command, nodes, from_torch=True)
    except torchrun.CommandRefused as refused:
        why = f"TI_TRAINING_COMMAND cannot run on {nodes} nodes: {refused}; allowed: {torchrun.ALLOWED}"
        raise GangError(why) from None


def launch_command(command: str, member: Member, nproc: int) -> tuple[str, Launch]:
    """The command the trainer runs on this node, and how it was decided (torchrun.py; docs/agent.md). A command
    that is neither wrappable nor the user's own torchrun fails the attempt in one line: run as given, it would be
    N independent trainers writing the same checkpoint keys."""
    planned = plan_for(command, member.nodes)
    if planned.how is Launch.USER_TORCHRUN:
        return command, Launch.USER_TORCHRUN
    options = [
        planned.interpreter, "-m", "torch.distributed.run",
        "--nnodes", str(member.nodes), "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", member.rendezvous, "--rdzv-id", member.rdzv_id,
        "--rdzv-conf", member.rdzv_conf, "--max-restarts", "100",
        *(["--no-python"] if planned.no_python else []),
    ]  # fmt: skip
    # The user's text from the script (or from the interpreter, with its flags) on, as typed: the shell expands it
    # as it would have; assignments go before `exec` (`exec A=1 python` runs a program named A=1).
    prefix = f"{planned.assignments} " if planned.assignments else ""
    return f"{prefix}exec {planned.launcher}{shlex.join(options)} {planned.tail}", Launch.WRAPPED


def gpu_count(nvidia_smi: str) -> int:
    """GPUs on this box (`nvidia-smi -L`: one `GPU n: ...` line each); 0 without a driver."""
    try:
        listed = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))


# ---------------------------------------------------------------- the trainer's whole tree
def tagged_pids(token: str, proc: Path = Path("/proc")) -> list[int]:
    """Every process whose environment carries TI_TRAINER_TOKEN=token: torchrun's workers start their
    own sessions (and outlive a killed torchrun as orphans), so its process group alone misses them."""
    needle = f"{TRAINER_TOKEN}={token}".encode()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return sorted(found)


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            continue


# ---------------------------------------------------------------- NCCL over EFA
class NcclNet(StrEnum):
    EFA = "efa"  # the aws-ofi-nccl plugin with libfabric's efa provider
    SOCKET = "socket"  # NCCL's TCP sockets: 10x slower between nodes, what the check is for
    OTHER = "other"  # OFI with another provider (tcp, sockets), or InfiniBand verbs
    UNKNOWN = "unknown"  # no NCCL init line yet (or the trainer uses gloo)


# aws-ofi-nccl's own init line (its NCCL_OFI_INFO prefixes "NET/OFI "): since v1.14.0 (2025, src/nccl_ofi_net.cpp)
# "Selected provider is efa, fabric is efa-direct (found 32 nics)", before it "Selected Provider is efa (found 4
# nics)". Either case, the provider is the word after "is".
NCCL_LINES = (
    (re.compile(r"NET/OFI Selected provider is efa(?=[\s,]|$)", re.IGNORECASE), NcclNet.EFA),
    (re.compile(r"NET/OFI Selected provider is (?!efa(?:[\s,]|$))[^\s,]+", re.IGNORECASE), NcclNet.OTHER),
    (re.compile(r"NCCL INFO Using network Socket\b|via NET/Socket/"), NcclNet.SOCKET),
    (re.compile(r"NCCL INFO Using network IB\b"), NcclNet.OTHER),
)


def nccl_network(lines: Iterable[str]) -> tuple[NcclNet, str]:
    """What NCCL's own init log (NCCL_DEBUG=INFO) says it uses between nodes, and the line that says so.
    A fallback to sockets wins over an earlier EFA line (one rank on TCP slows every collective)."""
    verdict, why = NcclNet.UNKNOWN, ""
    for line in lines:
        if "NCCL" not in line:
            continue
        for pattern, net in NCCL_LINES:
            if pattern.search(line):
                if net is NcclNet.SOCKET or verdict is NcclNet.UNKNOWN:
                    verdict, why = net, line.strip()
                break
        if verdict is NcclNet.SOCKET:
            break
    return verdict, why


def efa_devices(root: str = "") -> list[str]:
    """The EFA devices (`/dev/infiniband/uverbs*`) the box has: the types that support EFA get them at launch."""
    folder = Path(f"{root}/dev/infiniband")
    try:
        return sorted(str(p) for p in folder.iterdir() if p.name.startswith("uverbs"))
    except OSError:
        return []


class NcclCheck:
    """Reads the training log as it grows; `look()` answers a verdict once NCCL said which network it uses."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = 0
        self.tail = ""

    def look(self) -> tuple[NcclNet, str]:
        try:
            with open(self.log, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(4 * 1048576)
        except OSError:
            return NcclNet.UNKNOWN, ""
        self.offset += len(data)
        text = self.tail + data.decode("utf-8", "replace")
        lines = text.split("\n")
        self.tail = lines.pop()
        return nccl_network(lines)


# ---------------------------------------------------------------- checkpoints complete across nodes
def step_number(name: str) -> int | None:
    found = STEP_DIR.fullmatch(name)
    return int(found.group(1)) if found else None


def complete_steps(files: Iterable[str], nodes: int) -> list[str]:
    """Step folders (`step-N`) holding DCP's `.metadata` and every node's marker, oldest first."""
    by_step: dict[str, set[str]] = {}
    for name in files:
        step, _, rest = name.partition("/")
        if step_number(step) is not None and rest and "/" not in rest:
            by_step.setdefault(step, set()).add(rest)
    wanted = {METADATA, *(f".node-{k}.done" for k in range(nodes))}
    done = [step for step, names in by_step.items() if wanted <= names]
    return sorted(done, key=lambda step: step_number(step) or 0)


def local_files(folder: Path) -> list[str]:
    found = []
    for top, folders, files in os.walk(folder):
        folders.sort()
        for file in files:
            path = Path(top, file)
            if not path.is_symlink() and path.is_file():
                found.append(path.relative_to(folder).as_posix())
    return sorted(found)


@dataclass
class GangCheckpoints(RunCheckpointPaths):
    """The agent's checkpoint sync for node `node` of `nodes` (the single-node `Checkpoints` mirrors the
    whole folder and deletes what it no longer has, which would delete the other nodes' shards).

    - Upload: a `step-N/` folder once the trainer wrote its marker `.node-<k>.done` in it (its shards are
      saved), once: its files, then `_manifest.node-<k>.json` naming the S3 version of each, then the
      marker. A step is complete when `.metadata` and every node's marker are in S3.
    - Pull: the newest complete step into the local folder (the other nodes' shards, then the markers),
      so a worker that torchrun restarts after a lost peer finds every shard DCP needs.
    - Prune: a step this node uploaded and the trainer deleted goes from S3 too (this node's files only),
      once it is older than the newest complete step.
    - Restore: the newest complete step, each file at the version its node's manifest recorded.
    """

    aws: Aws
    folder: Path
    state_dir: Path
    bucket: str
    run_id: str
    node: int
    nodes: int
    log: Callable[[str], None]
    note: Callable[[str], None]
    state: SyncState = field(default_factory=SyncState)
    mine: dict[str, dict[str, dict]] = field(default_factory=dict)  # step -> name -> version (this node's manifest)
    settled: set[str] = field(default_factory=set)  # steps uploaded, restored or pulled: never uploaded (again)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def manifest_key(self) -> str:
        return f"{self.key_prefix}_manifest.node-{self.node}.json"

    def listing(self, under: str = "") -> dict[str, dict]:
        """name -> {version_id, size} of the newest version of every object under the run's checkpoints
        (or under its folder `under`), names relative to the run's checkpoints."""
        try:
            latest = self.aws.latest_versions(self.bucket, self.key_prefix + under)
        except AwsError as error:
            raise OSError(f"cannot list {self.url}/: {error}") from None
        return {key[len(self.key_prefix) :]: version for key, version in latest.items()}

    # ------------------------------------------------------------ the periodic and final sync
    def sync(self) -> bool:
        with self._lock:
            began, snapshot_at = time.monotonic(), time.time()
            try:
                self._upload_finished()
                listed = self.listing()
                self._prune(complete_steps(listed, self.nodes))
                self._pull_newest(listed)
            except (OSError, AwsError) as error:
                self.log(f"gang checkpoint sync: {error}")
                return False
            self.state.last_sync_seconds = time.monotonic() - began
            self.state.complete_as_of = snapshot_at
            return True

    def end_in_flight(self) -> int:
        return 0  # each call is short (one step's files); the final sync waits for the lock

    def _local_steps(self) -> list[str]:
        try:
            names = [p.name for p in self.folder.iterdir() if p.is_dir() and not p.is_symlink()]
        except OSError:
            return []
        return sorted((n for n in names if step_number(n) is not None), key=lambda n: step_number(n) or 0)

    def _upload_finished(self) -> None:
        """Every finished step, oldest first; one the trainer deleted before it went up is skipped (a newer
        one supersedes it), so no step is half-uploaded and then marked."""
        marker = f".node-{self.node}.done"
        for step in self._local_steps():
            local = self.folder / step
            if step in self.settled or not (local / marker).is_file():
                continue
            own = [n for n in local_files(local) if not MARKER.match(n) and not n.endswith(".tmp")]
            try:
                self._send(local, step, own)
            except FileNotFoundError:
                self.settled.add(step)
                self.log(f"checkpoint {step}: deleted by the trainer before it went up (a newer one follows)")
                continue
            listed = self.listing(f"{step}/")
            missing = [n for n in own if f"{step}/{n}" not in listed]
            if missing:
                raise OSError(f"{step}: {len(missing)} files not in S3 after the upload ({missing[0]} ...)")
            self.mine[step] = {n: listed[f"{step}/{n}"] for n in own}
            self._put(self.manifest_key, json.dumps({"node": self.node, "steps": self.mine}, indent=1).encode())
            self._put(f"{self.key_prefix}{step}/{marker}", b"")
            self.settled.add(step)
            self.log(f"checkpoint {step}: node {self.node}'s {len(own)} files and its marker are in S3")

    def _send(self, local: Path, step: str, names: list[str]) -> None:
        """Small shards through the agent's own S3 client (no process per call); a large one with the AWS
        CLI, which uploads in parallel parts. FileNotFoundError: the step was deleted under it."""
        small = []
        for name in names:
            size = (local / name).stat().st_size
            if size > SMALL_FILE_BYTES:
                sent = self.aws.cli(
                    "s3", "cp", str(local / name), f"{self.url}/{step}/{name}", "--only-show-errors"
                )  # fmt: skip
                if not sent.ok:
                    if not (local / name).exists():
                        raise FileNotFoundError(local / name)
                    raise OSError(sent.stderr or sent.stdout)
            else:
                small.append(name)
        for name in small:
            self._put(f"{self.key_prefix}{step}/{name}", (local / name).read_bytes())

    def _put(self, key: str, body: bytes) -> None:
        self.aws.put_object(self.bucket, key, body)

    def _prune(self, complete: list[str]) -> None:
        """Only steps older than S3's newest complete one: while the other nodes lag, an older step the
        trainer deleted here may still be the newest the gang could resume from."""
        newest = step_number(complete[-1]) if complete else None
        gone = [
            step
            for step in self.mine
            if not (self.folder / step).is_dir() and newest is not None and (step_number(step) or 0) < newest
        ]
        if not gone:
            return
        keys = [
            f"{self.key_prefix}{step}/{name}" for step in gone for name in [*self.mine[step], f".node-{self.node}.done"]
        ]
        try:
            self.aws.delete_keys(self.bucket, keys)
        except AwsError as error:
            raise OSError(f"cannot delete pruned steps {gone}: {error}") from None
        self.log(f"pruned {' '.join(gone)}: node {self.node}'s {len(keys)} objects deleted from {self.url}/")
        for step in gone:
            del self.mine[step]
        self._put(self.manifest_key, json.dumps({"node": self.node, "steps": self.mine}, indent=1).encode())

    def _pull_newest(self, listed: dict[str, dict]) -> None:
        complete = complete_steps(listed, self.nodes)
        if not complete:
            return
        newest = complete[-1]
        if newest in self.settled and not (self.folder / newest).is_dir():
            return  # the trainer deleted it here (it saved newer ones): not brought back
        have = set(local_files(self.folder / newest)) if (self.folder / newest).is_dir() else set()
        wanted = {name.split("/", 1)[1] for name in listed if name.startswith(f"{newest}/")}
        if wanted <= have:
            self.settled.add(newest)
            return
        try:
            self._download(newest, sorted(wanted - have), self._versions(newest))
        except OSError as error:
            if "NoSuchKey" not in str(error) and "404" not in str(error):
                raise
            self.log(f"checkpoint {newest}: pruned by its node while it was pulled (a newer one follows)")
            return
        self.settled.add(newest)
        self.log(f"checkpoint {newest}: complete across {self.nodes} nodes, the other nodes' files pulled")

    def _versions(self, step: str) -> dict[str, str]:
        """name -> version id each node's manifest recorded for `step` (the version rule of single-node runs)."""
        recorded: dict[str, str] = {}
        for k in range(self.nodes):
            try:
                document = json.loads(self.aws.get_object(self.bucket, f"{self.key_prefix}_manifest.node-{k}.json"))
            except (AwsError, ValueError):  # no manifest (yet): that node's files go by name
                continue
            files = document.get("steps", {}).get(step, {}) if isinstance(document, dict) else {}
            for name, version in files.items() if isinstance(files, dict) else ():
                if isinstance(version, dict) and isinstance(version.get("version_id"), str):
                    recorded[name] = version["version_id"]
        return recorded

    def _download(self, step: str, names: list[str], versions: dict[str, str]) -> None:
        """Data files first (by name where S3's newest is the recorded version, else by version), markers last."""
        local = self.folder / step
        for name in names:
            try:
                safe_join(local, name)
            except UnsafePath as error:
                raise AttemptFailed(f"checkpoint key {self.key_prefix}{step}/{name!r} refused: {error}") from None
        listed = self.listing()
        data = [n for n in names if not MARKER.match(n)]
        markers = [n for n in names if MARKER.match(n)]
        by_name = [n for n in data if versions.get(n) in (None, listed.get(f"{step}/{n}", {}).get("version_id"))]
        for name in (n for n in data if n not in by_name):
            target = safe_join(local, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            got = self.aws.cli(
                "s3api", "get-object", "--bucket", self.bucket, "--key", f"{self.key_prefix}{step}/{name}",
                "--version-id", versions[name], str(target),
            )  # fmt: skip
            if not got.ok:
                if "NoSuchVersion" in got.stderr:
                    raise AttemptFailed(
                        f"checkpoint {step}/{name}: the version its node's manifest recorded is gone; newer objects"
                        " may mix two saves"
                    )
                raise OSError(got.stderr)
        for group in (by_name, markers):
            if group:
                synced = self.aws.cli(
                    "s3", "sync", f"{self.url}/{step}/", f"{local}/", *include_filters(group), "--only-show-errors"
                )
                if not synced.ok:
                    raise OSError(synced.stderr)

    # ------------------------------------------------------------ restore (before the trainer starts)
    def restore(self) -> None:
        listed = self.listing()
        self._adopt_manifest(listed)
        complete = complete_steps(listed, self.nodes)
        if not complete:
            partial = sorted({n.split("/", 1)[0] for n in listed if step_number(n.split("/", 1)[0]) is not None})
            why = f" (incomplete: {' '.join(partial[-3:])})" if partial else ""
            self.log(f"no complete checkpoint step in {self.url}/{why}: starting without one")
            return
        newest = complete[-1]
        names = sorted(n.split("/", 1)[1] for n in listed if n.startswith(f"{newest}/"))
        self._download(newest, names, self._versions(newest))
        self.settled.add(newest)
        self.log(
            f"checkpoint {newest}: the newest step complete across {self.nodes} nodes, {len(names)} files restored"
        )

    def _adopt_manifest(self, listed: dict[str, dict]) -> None:
        """This node index's manifest as the node before it left it (a replacement, or node k of an earlier
        attempt): its steps still in S3 stay recorded, so the next manifest this node writes keeps their versions
        (the restore's version rule) and the prune deletes them once superseded, instead of forgetting them."""
        try:
            document = json.loads(self.aws.get_object(self.bucket, self.manifest_key))
        except (AwsError, ValueError):  # none yet (a new run), or unreadable: nothing to carry on
            return
        steps = document.get("steps") if isinstance(document, dict) else None
        for step, files in (steps or {}).items() if isinstance(steps, dict) else ():
            if step_number(step) is None or not isinstance(files, dict):
                continue
            kept = {n: v for n, v in files.items() if f"{step}/{n}" in listed and isinstance(v, dict)}
            if kept:
                self.mine.setdefault(step, kept)
                self.settled.add(step)  # uploaded by the node before: never uploaded again from here

    def newest_local(self) -> float | None:
        return None  # freshness is judged per upload here: each step goes up once, whole


# ---------------------------------------------------------------- the agent's hooks
def join(agent: Agent) -> None:
    """With `training-infra:nodes` > 1: wait for this node's place, then take the gang's checkpoints.
    Sets `agent.member` (None: a single-node run, which goes on exactly as before)."""

    def tags() -> dict[str, str]:
        keys = (agent.imds.get("meta-data/tags/instance") or "").splitlines()
        return {key: agent.imds.get(f"meta-data/tags/instance/{key}") or "" for key in keys if key.startswith(TAG)}

    first: dict[str, str] | None = None
    for _ in range(3):  # IMDS answered a moment ago: a failed look here must not make a member run alone
        try:
            first = tags()
            break
        except OSError as error:
            agent.log(f"instance tags: {error}")
            time.sleep(1)
    if first is None:
        raise GangError("could not read the instance tags from IMDS (3 tries): cannot tell whether this is a gang")
    if gang_size(first) == 1:
        return
    wait = agent.knobs.rendezvous_wait_seconds
    agent.log(f"gang of {gang_size(first)} nodes: waiting up to {wait}s for tags {TAG}:node and {TAG}:rendezvous")
    began = time.monotonic()

    def read() -> Mapping[str, str]:
        try:
            return tags()
        except OSError:
            return {}

    member = wait_for_member(read, run_id=agent.run_id, attempt=agent.attempt, wait_seconds=wait)
    plan_for(agent.config.training_command, member.nodes)  # refused before the image pull, not after it
    member = replace(
        member, join_timeout=join_timeout_seconds(agent.knobs.gang_replace_seconds, agent.knobs.pull_timeout_seconds)
    )
    agent.member = member
    agent.note(
        f"node {member.node} of {member.nodes} (rendezvous {member.rendezvous}, id {member.rdzv_id}),"
        f" placed after {time.monotonic() - began:.1f}s; a rendezvous round waits up to {member.join_timeout}s"
    )
    agent.checkpoints = GangCheckpoints(
        aws=agent.aws,
        folder=agent.ckpt_dir,
        state_dir=agent.state,
        bucket=agent.outputs_bucket,
        run_id=agent.run_id,
        node=member.node,
        nodes=member.nodes,
        log=agent.log,
        note=agent.note,
    )


def efa_env(devices: list[str]) -> dict[str, str]:
    """libfabric's settings on a box with EFA devices (none without). What it leaves out is on purpose:
    - FI_EFA_USE_DEVICE_RDMA: unset, libfabric uses RDMA where the device has it ("If not set, RDMA
      operations will occur when available", fi_efa(7)); `=1` makes libfabric ABORT on devices without
      RDMA read (g5, g6 and other non-P families), and the device, not a list of types, is what knows.
      aws-samples/awsome-distributed-training efa-cheatsheet.md: do not set it for libfabric >= 1.18 and
      aws-ofi-nccl >= 1.7; the same page drops NCCL_PROTO=simple (aws-ofi-nccl <= 1.5 only) and
      FI_EFA_FORK_SAFE (not needed on kernels >= 5.15), and says never RDMAV_FORK_SAFE.
    - FI_PROVIDER=efa: the EFA provider or none, so libfabric cannot settle on its TCP provider when the
      EFA device fails to open (aws-ofi-nccl asks for efa on AWS already); NCCL's own fallback to
      sockets is what the NCCL check (NcclWatcher) then catches.
    - FI_EFA_USE_HUGE_PAGE=0: the cheatsheet's preset for current libfabric: with huge pages, forked
      PyTorch DataLoader workers fail with "Cannot allocate memory"; the cost is a minor slowdown.
    A user's --env line for any of them wins (launch() keeps the user's lines)."""
    if not devices:
        return {}
    return {"FI_PROVIDER": "efa", "FI_EFA_USE_HUGE_PAGE": "0"}


def launch(agent: Agent, command: str) -> tuple[str, tuple[str, ...]]:
    """The trainer's command on this node and the container engine's extra flags; writes the gang's
    variables into the trainer's environment file (before the user's --env lines, which win).

    The container gets the host's network: node 0's c10d store, NCCL's and gloo's bootstrap and EFA need
    the peers to reach it on the host's address. The launch template's hop limit keeps IMDS only from
    bridged containers, so before the container starts its cgroup is kept from IMDS (imds_block); when
    that cannot be done the attempt fails before anything starts (fail closed). The `process` runtime
    (tests, local) has no container: its trainer is the agent's child, as for single-node runs."""
    member = agent.member
    if member is None:
        return command, ()
    block: tuple[str, ...] = ()
    if agent.settings.runtime.value == "docker":
        block = ImdsBlock(
            endpoint=agent.imds.endpoint, docker=agent.knobs.docker, env=agent.aws.cli_env(), log=agent.log
        ).install()
    nproc = max(gpu_count(agent.knobs.nvidia_smi), 1)
    devices = efa_devices(agent.root)
    env = trainer_env(member, nproc, nccl_debug=bool(devices) and agent.knobs.nccl_efa_check)
    env.update(efa_env(devices))
    path = agent.state / "trainer.env"
    user = path.read_text() if path.exists() else ""
    user_keys = {line.split("=", 1)[0] for line in user.splitlines() if "=" in line}
    problem = torchrun.gang_env_problem(user_keys)  # launch refuses them; a request from elsewhere ends here
    if problem:
        raise GangError(f"the trainer's environment has {problem}; launch the run without them")
    ours = "".join(f"{k}={v}\n" for k, v in env.items() if k not in user_keys)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(ours + user)
    launched, how = launch_command(command, member, nproc)
    words = {
        Launch.WRAPPED: f"wrapped in torchrun ({nproc} per node): {launched}",
        Launch.USER_TORCHRUN: "the command's own torchrun, its missing flags from PET_*",
    }
    agent.note(f"gang launch: {words[how]}")
    return launched, engine_args(devices, block)


def check_placement(agent: Agent, args: tuple[str, ...], container: str) -> None:
    """Once the container runs: it must be under the cgroup parent the IMDS rule matches (imds_block.check_container),
    else it is stopped at once and the attempt fails (fail closed)."""
    if "--cgroup-parent" not in args:
        return
    parent = "/" + args[args.index("--cgroup-parent") + 1].lstrip("/")
    try:
        path = imds_block.check_container(agent.knobs.docker, container, parent, env=agent.aws.cli_env())
    except imds_block.BlockError:
        if agent.trainer is not None:
            agent.trainer.stop(0)
        raise
    agent.log(f"the trainer container is in cgroup {path}, under {parent}: kept from IMDS")


def engine_args(devices: list[str], block: tuple[str, ...]) -> tuple[str, ...]:
    """Host networking (peers reach each other on every port), unlimited locked memory (EFA registers
    memory), each EFA device, and the IMDS block's cgroup parent."""
    device_args = (a for d in devices for a in ("--device", d))
    return ("--network", "host", "--ulimit", "memlock=-1:-1", *device_args, *block)


# A gang's finished steps go up, and the other nodes' come down, this often (not at checkpoint_sync_seconds).
STEP_SYNC_SECONDS = 5.0


def start_watchers(agent: Agent) -> None:
    if agent.member is None:
        return
    StepSyncWatcher(agent).start()
    if agent.knobs.nccl_efa_check and efa_devices(agent.root):
        NcclWatcher(agent).start()


class StepSyncWatcher(Watcher):
    """A step only one node's disk holds is no step for the others: a replacement restores the newest complete
    step from S3 and the survivors' restarted workers agree on the newest step complete on every node's disk.
    At the periodic sync (5 min by default) a lost node's last steps would be incomplete when the gang meets
    again, and the trainer would start over (or from a step minutes old). One listing per node every few
    seconds (about $0.09 a day per node at S3's list price) keeps them complete within seconds of the save."""

    every = STEP_SYNC_SECONDS

    def tick(self) -> bool:
        if self.agent.checkpoints is None:
            return True
        self.agent.checkpoints.sync()
        return False


class NcclWatcher(threading.Thread):
    """Fails the attempt when NCCL's init log shows TCP sockets (or another provider) instead of EFA."""

    every = 1.0
    give_up_seconds = 900.0

    def __init__(self, agent: Agent) -> None:
        super().__init__(name="NcclWatcher", daemon=True)
        self.agent = agent
        self.check = NcclCheck(agent.train_log)

    def run(self) -> None:
        began = time.monotonic()
        while not self.agent.halt.wait(self.every):
            net, line = self.check.look()
            if net is NcclNet.EFA:
                self.agent.note(f"NCCL uses EFA: {line}")
                return
            if net in (NcclNet.SOCKET, NcclNet.OTHER):
                self.agent.request_stop(
                    Outcome.FAILED,
                    f"NCCL is not using EFA on a box with EFA devices ({line!r}); launch with --no-nccl-efa-check to"
                    " run anyway",
                    self.agent.config.stop_grace_seconds,
                )
                return
            if time.monotonic() - began > self.give_up_seconds:
                self.agent.note(
                    "NCCL EFA check: no NCCL init line in 15 min (a gloo trainer, or NCCL_DEBUG below INFO in --env?):"
                    " not checked"
                )
                return


def kill_tree(token: str, sig: int = signal.SIGKILL) -> int:
    """Signal every process of the trainer's tree (by its token); answers how many were signalled."""
    pids = tagged_pids(token)
    signal_pids(pids, sig)
    return len(pids)
