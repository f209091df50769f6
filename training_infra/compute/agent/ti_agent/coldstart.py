"""The cold start (issue 29): image pull, data and checkpoint restore at once, so the time to the
first step is the slowest transfer, not the sum.

Each part runs in its own forked process in its own process group: the AWS CLI and `docker pull`
it spawns are in that group, so when one part fails for good the others end at once (SIGTERM to
each group, SIGKILL after `KILL_AFTER_SECONDS`), whatever subprocess they were waiting on. The
parts share nothing in memory (each writes its own folder, or the engine's image store), so a fork
loses nothing: the child says only "done" or one line of why not, through a pipe. `docs/agent.md`
("The cold start") has the measurements and the lazy image and `mount` rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from . import handover
from .aws import AwsError
from .checkpoints import AttemptFailed

if TYPE_CHECKING:
    from .agent import Agent

KILL_AFTER_SECONDS = 5
MESSAGE_LIMIT = 4000  # one line; a pipe holds 64 KB, so the child's write never blocks


class Part(StrEnum):
    IMAGE = "image"
    DATA = "data"
    CHECKPOINTS = "checkpoints"


class DataAccess(StrEnum):
    SYNC = "sync"  # `aws s3 sync` to /data before the trainer starts (the disk must hold it)
    MOUNT = "mount"  # Mountpoint for Amazon S3, read-only at /data: data larger than the disk


@dataclass(frozen=True)
class PartResult:
    part: Part
    started: float  # monotonic, for the overlap; `seconds` is what the record keeps
    ended: float
    ok: bool
    message: str = ""  # why it failed (one line); "" when it ran to the end or was stopped

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True)
class ColdStart:
    """What status.json keeps as `cold_start` and the log says in one line."""

    parts: tuple[PartResult, ...]
    seconds: float  # the first part's start to the last part's end
    failed: Part | None = None
    started_at: float = 0.0  # epoch (time.time) at the first part's start: where the first step is timed from

    def record(self) -> dict:
        return {
            "started_at": round(self.started_at, 3),
            "total_seconds": round(self.seconds, 2),
            "parts": {result.part.value: round(result.seconds, 2) for result in self.parts},
            "slowest": self.slowest.part.value if self.parts else None,
            "failed": self.failed.value if self.failed else None,
        }

    @property
    def slowest(self) -> PartResult:
        return max(self.parts, key=lambda result: result.seconds)

    def summary(self) -> str:
        each = ", ".join(f"{result.part.value} {result.seconds:.1f}s" for result in self.parts)
        total = sum(result.seconds for result in self.parts)
        return f"cold start {self.seconds:.1f}s ({each}; one after another: {total:.1f}s)"


class ColdStartFailed(Exception):
    """One part failed for good: the others were stopped; the message names the part."""

    def __init__(self, message: str, result: ColdStart) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class _Child:
    part: Part
    pid: int
    read_fd: int
    started: float


def run_parts(
    parts: Mapping[Part, Callable[[], None]],
    *,
    log: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> ColdStart:
    """Each part at once in its own process group; returns when all are done, or raises
    ColdStartFailed after the first failure has stopped the rest. A part fails by raising: its
    message (one line) is what the agent reports. Any exception here (a signal to the agent)
    still ends every child."""
    done: queue.Queue[PartResult] = queue.Queue()
    children: dict[Part, _Child] = {}
    first, first_epoch = clock(), wall()
    try:
        for part, action in parts.items():  # every fork before any thread: a child inherits no thread
            children[part] = _fork(part, action, clock)
        for child in children.values():
            reaper = threading.Thread(target=_reap, args=(child, done, clock), name=f"coldstart-{child.part}")
            reaper.daemon = True
            reaper.start()
        results: dict[Part, PartResult] = {}
        failed: PartResult | None = None
        while len(results) < len(children):
            try:
                result = done.get(timeout=0.5)
            except queue.Empty:
                continue
            results[result.part] = result
            if not result.ok and failed is None:
                failed = result
                running = [part for part in children if part not in results]
                if running:
                    log(f"{result.part.value} failed: stopping {', '.join(part.value for part in running)}")
                _stop([children[part] for part in running])
        ordered = tuple(results[part] for part in parts)
        ended = max(r.ended for r in ordered) - first
        outcome = ColdStart(ordered, ended, failed.part if failed else None, started_at=first_epoch)
        if failed is not None:
            raise ColdStartFailed(f"cold start: {failed.part.value} failed: {failed.message}", outcome)
        return outcome
    finally:
        _stop([child for child in children.values() if _alive(child.pid)])


def _fork(part: Part, action: Callable[[], None], clock: Callable[[], float]) -> _Child:
    read_fd, write_fd = os.pipe()
    started = clock()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the agent's own flow
        code = 1
        try:
            os.close(read_fd)
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                action()
                code, message = 0, ""
            except BaseException as error:  # noqa: BLE001 - told to the parent in one line
                message = " ".join(str(error).split()) or "".join(traceback.format_exception_only(error)).strip()
            os.write(write_fd, message[:MESSAGE_LIMIT].encode(errors="replace"))
        finally:
            os._exit(code)
    os.close(write_fd)
    with contextlib.suppress(OSError):  # the child may have done it (or exited) first
        os.setpgid(pid, pid)
    return _Child(part, pid, read_fd, started)


def _reap(child: _Child, done: queue.Queue[PartResult], clock: Callable[[], float]) -> None:
    _, status = os.waitpid(child.pid, 0)
    ended = clock()
    with os.fdopen(child.read_fd, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    code = os.waitstatus_to_exitcode(status)
    if code < 0 and not message:
        message = f"ended by {signal.Signals(-code).name}"
    done.put(PartResult(child.part, child.started, ended, code == 0, message))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie the reaper thread has not waited for yet answers too: its group is what matters.
    return _group_alive(pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop(children: list[_Child]) -> None:
    """SIGTERM to each child's whole group (its AWS CLI, its docker pull), SIGKILL after a grace."""
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_AFTER_SECONDS
    while any(_group_alive(child.pid) for child in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)


# ---------------------------------------------------------------- lazy image loading (SOCI)
SOCI_TAG_SUFFIX = "-soci"  # .github/workflows/image.yml pushes the SOCI-enabled image under <tag>-soci
SOCI_SOCKET = Path("/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock")


@dataclass(frozen=True)
class PullMode:
    lazy: bool
    why: str  # said in the log either way


def pull_mode(docker: str, *, env: Mapping[str, str], socket: Path = SOCI_SOCKET, timeout: float = 30) -> PullMode:
    """Lazy only where the engine's own image store is the SOCI snapshotter: then `docker pull`
    fetches the SOCI index and the manifests and `docker run` reads file by file. A SOCI snapshotter
    that only nerdctl uses (containerd's own namespace) does not help `docker run`, so it is a plain
    pull then, and the log says why."""
    try:
        info = subprocess.run(  # noqa: S603 - the engine, arguments as a list
            [docker, "info", "--format", "{{.Driver}}"], capture_output=True, text=True, timeout=timeout,
            env=dict(env), check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        return PullMode(False, f"plain pull: `{docker} info` did not answer ({error})")
    driver = info.stdout.strip()
    if info.returncode == 0 and driver == "soci":
        return PullMode(True, f"lazy pull: {docker}'s image store is the SOCI snapshotter (the image's SOCI index)")
    seen = "running" if socket.exists() else "not running"
    return PullMode(
        False, f"plain pull: {docker}'s storage driver is '{driver or 'unknown'}', not soci (soci snapshotter {seen})"
    )


# ---------------------------------------------------------------- data larger than the disk (mount)
MOUNT_S3 = "mount-s3"
INSTANCE_STORE = Path("/opt/dlami/nvme")  # the DLAMI mounts the instance store (NVMe) here when the type has one


def mount_cache(root: str, *, instance_store: Path = INSTANCE_STORE, volume_dir: Path) -> Path:
    """Mountpoint's local cache: on the instance store when the type has one, else on the volume."""
    store = Path(f"{root}{instance_store}")
    if store.is_dir() and os.path.ismount(store):
        return store / "mountpoint-cache"
    return volume_dir / "mountpoint-cache"


def mount_argv(mounter: str, *, bucket: str, target: Path, cache: Path, region: str) -> list[str]:
    """Read-only, `data/` only (the sync's prefix), the cache where `mount_cache` said; the
    instance role's credentials (IMDS) as for every other call."""
    argv = [mounter, bucket, str(target), "--read-only", "--prefix", "data/", "--cache", str(cache)]
    argv += ["--allow-other"]  # the trainer's container may run as another user
    if region:
        argv += ["--region", region]
    return argv


def check_mount(target: Path) -> str:
    """'' when `target` is a mount point that lists and is read-only; else one line of why not."""
    if not os.path.ismount(target):
        return f"{target} is not a mount point"
    try:
        next(iter(os.scandir(target)), None)
    except OSError as error:
        return f"{target} cannot be listed: {error.strerror}"
    if not os.statvfs(target).f_flag & os.ST_RDONLY:
        return f"{target} is mounted read-write"
    return ""


def which(program: str, path: str) -> str | None:
    return shutil.which(program, path=path)


# ---------------------------------------------------------------- the agent's three parts
def start(agent: Agent) -> ColdStart:
    """Image, data and checkpoints at once; the trainer starts after this returns. Raises
    AttemptFailed (one line naming the part) when one failed; `agent.cold_start` keeps the times."""
    parts = {
        Part.IMAGE: lambda: _image(agent),
        Part.DATA: lambda: _data(agent),
        Part.CHECKPOINTS: lambda: _restore(agent),
    }
    try:
        result = run_parts(parts, log=agent.log)
    except ColdStartFailed as failed:
        _report(agent, failed.result)
        raise AttemptFailed(str(failed)) from None
    _report(agent, result)
    return result


def _report(agent: Agent, result: ColdStart) -> None:
    """The training log, status.json (at the end) and, at once, cold_start.json for `status RUN`."""
    agent.cold_start = result
    agent.note(result.summary())
    key = f"runs/{agent.run_id}/attempts/{agent.attempt}/cold_start.json"
    try:
        agent.aws.put_object(agent.outputs_bucket, key, (json.dumps(result.record()) + "\n").encode())
    except (AwsError, OSError) as error:
        agent.log(f"WARNING: cold_start.json not uploaded (status.json still has it): {error}")


def _image(agent: Agent) -> None:
    if agent.settings.runtime.value == "docker":
        mode = pull_mode(agent.knobs.docker, env=agent.aws.cli_env())
        agent.note(mode.why)
        if mode.lazy and _lazy_pull(agent):
            return
    if not agent.retry(f"image {agent.image}", agent.fetch_image):
        raise AttemptFailed(f"could not get image {agent.image} from ECR after {agent.knobs.retry_attempts} attempts")


def _lazy_pull(agent: Agent) -> bool:
    """The SOCI-enabled image the image workflow pushes beside the image (`<tag>-soci`, SOCI index
    manifest v2), tagged back as `<tag>` so `docker run` starts it; False: a plain pull follows.
    This runs in the image part's own process, so the tag swapped here never reaches the agent."""
    plain = agent.image
    config = agent.settings.config
    agent.settings = dataclasses.replace(
        agent.settings, config=dataclasses.replace(config, image_tag=f"{config.image_tag}{SOCI_TAG_SUFFIX}")
    )
    if not agent.fetch_image():
        agent.note(f"no SOCI-enabled image {agent.image}: plain pull of {plain}")
        agent.settings = dataclasses.replace(agent.settings, config=config)
        return False
    tagged = agent.engine("tag", agent.image, plain, timeout=60)
    agent.settings = dataclasses.replace(agent.settings, config=config)
    return tagged is not None and tagged.returncode == 0


def _data(agent: Agent) -> None:
    config = agent.config
    if config.data_access == DataAccess.MOUNT:
        _mount(agent)
        return
    data = f"s3://{config.data_bucket}/data/"
    if not agent.retry(
        "data sync", lambda: agent.cli_ok("s3", "sync", data, f"{agent.data_dir}/", "--only-show-errors")
    ):
        raise AttemptFailed(f"could not sync {data} to {agent.data_dir} after {agent.knobs.retry_attempts} attempts")
    agent.log(f"data: {sum(1 for p in agent.data_dir.rglob('*') if p.is_file())} files in {agent.data_dir}")


def _mount(agent: Agent) -> None:
    """Mountpoint for Amazon S3, read-only at /data; checked before the trainer may start."""
    config, mounter = agent.config, agent.knobs.mount_s3
    where = f"s3://{config.data_bucket}/data/"
    cache = mount_cache(agent.root, volume_dir=agent.agent_dir)
    cache.mkdir(parents=True, exist_ok=True)
    argv = mount_argv(mounter, bucket=config.data_bucket, target=agent.data_dir, cache=cache, region=agent.aws.region)
    agent.note(f"data: mounting {where} read-only at {agent.data_dir} (cache {cache})")
    try:
        done = subprocess.run(  # noqa: S603 - mount-s3, arguments as a list
            argv, capture_output=True, text=True, timeout=agent.knobs.pull_timeout_seconds,
            env=agent.aws.cli_env(), check=False,
        )  # fmt: skip
    except FileNotFoundError:
        raise AttemptFailed(
            f"data_access=mount: {mounter} is not installed on this AMI (install Mountpoint for Amazon S3, or use"
            " data_access=sync)"
        ) from None
    except subprocess.TimeoutExpired:
        timeout = agent.knobs.pull_timeout_seconds
        raise AttemptFailed(f"data_access=mount: {mounter} did not answer in {timeout}s") from None
    said = " ".join((done.stderr or done.stdout).split()) or f"exit code {done.returncode}"
    if done.returncode != 0:
        raise AttemptFailed(f"data_access=mount: {mounter} could not mount {where} at {agent.data_dir}: {said}")
    if why := check_mount(agent.data_dir):
        raise AttemptFailed(f"data_access=mount: {where} is not usable at {agent.data_dir}: {why}")
    agent.log(f"data: {where} mounted read-only at {agent.data_dir}")


def _restore(agent: Agent) -> None:
    assert agent.checkpoints is not None
    handover.before_restore(agent)  # a replacement on the spot notice: the old attempt's final checkpoint first
    if not agent.retry("checkpoint restore", agent._restore):  # noqa: SLF001 - the agent's own restore step
        raise AttemptFailed(f"could not restore checkpoints from {agent.checkpoints.url}/")
    restored = sum(1 for p in agent.ckpt_dir.rglob("*") if p.is_file())
    agent.log(f"checkpoints: {restored} files restored from {agent.checkpoints.url}/")
