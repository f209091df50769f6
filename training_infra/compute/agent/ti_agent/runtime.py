"""The trainer runtimes: `docker` (production: the image, with the container contract) and `process`
(the same command run directly, for boxes and tests without an engine)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .gang import TRAINER_TOKEN, kill_tree, tagged_pids

CONTAINER = "training-infra-trainer"
# $TENSORBOARD_DIR, under the outputs folder: synced to runs/<id>/tensorboard/ with the logs (Agent.upload_logs).
TENSORBOARD = "tensorboard"


@dataclass(frozen=True)
class TrainerSpec:
    command: str
    image: str
    run_id: str
    region: str
    data_dir: Path
    out_dir: Path
    ckpt_dir: Path
    progress_dir: Path
    heartbeat_host: Path  # where the agent reads the beats
    heartbeat_file: str  # where the trainer writes them (the container's view)
    stop_grace_seconds: int
    trainer_env: Path  # KEY=VALUE lines (TI_EXTRA_ENV)
    secrets_env: Path  # KEY=VALUE lines, 0600, removed once the trainer has them
    aws_dir: Path | None  # the trainer role's config + session, None: no AWS credentials
    train_log: Path
    engine_args: tuple[str, ...] = ()  # a gang's container flags (host network, memlock, EFA devices)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _env_lines(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


PARAMS_FILE = "params.json"  # a sweep trial's parameters (TI_PARAMS) as a file, in the progress folder
CONTAINER_PROGRESS = "/run/training-infra/progress"


def write_params(spec: TrainerSpec) -> bool:
    """A sweep member's TI_PARAMS (its --env line, one-line JSON) also as a file for the trainer (issue 26):
    `TI_PARAMS_FILE` names it. In the progress folder, which both runtimes already give the trainer."""
    params = _env_lines(spec.trainer_env).get("TI_PARAMS")
    if params is None:
        return False
    spec.progress_dir.mkdir(parents=True, exist_ok=True)
    (spec.progress_dir / PARAMS_FILE).write_text(params + "\n")
    return True


def shm_size(meminfo: Path = Path("/proc/meminfo")) -> str:
    """PyTorch data loaders pass batches through /dev/shm: half the memory, at least 1 GiB (Docker's is 64 MiB)."""
    found = re.search(r"^MemTotal:\s+(\d+)", meminfo.read_text(), re.MULTILINE)
    half = int(found.group(1)) // 2 if found else 0
    return f"{max(half, 1048576)}k"


class Trainer:
    """A started trainer: its process group, its exit, its stop."""

    def __init__(self, spec: TrainerSpec, log: Callable[[str], None], note: Callable[[str], None]) -> None:
        self.spec = spec
        self.log = log
        self.note = note
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        """Anything left of its process group (the trainer or a child it started)."""
        return self.process is not None and group_alive(self.process.pid)

    def poll(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        with open(self.spec.train_log, "ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - the trainer, arguments as a list
                # Its own process group: stopped with every child it starts.
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                process_group=0,
            )

    def signal_group(self, sig: int) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)

    def wait_gone(self, seconds: float) -> bool:
        """Wait up to `seconds` for the whole group to end; True when it did."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if self.process is not None:
                self.process.poll()
            if not self.alive():
                return True
            time.sleep(0.2)
        return not self.alive()


class ProcessTrainer(Trainer):
    runtime = "process"
    # In every process the trainer starts: torchrun's workers start their own sessions, so the process
    # group alone misses them; the token finds them, orphans included (gang.tagged_pids).
    token = ""

    def alive(self) -> bool:
        return super().alive() or bool(self.token and tagged_pids(self.token))

    def start(self, environ: dict[str, str]) -> None:
        spec = self.spec
        env = dict(environ)
        self.token = uuid.uuid4().hex
        env[TRAINER_TOKEN] = self.token
        env.update(
            RUN_ID=spec.run_id,
            DATA_DIR=str(spec.data_dir),
            OUTPUT_DIR=str(spec.out_dir),
            CHECKPOINT_DIR=str(spec.ckpt_dir),
            HEARTBEAT_FILE=str(spec.heartbeat_host),
            TENSORBOARD_DIR=str(spec.out_dir / TENSORBOARD),
        )
        if write_params(spec):
            env["TI_PARAMS_FILE"] = str(spec.progress_dir / PARAMS_FILE)
        env.update(_env_lines(spec.trainer_env))
        env.update(_env_lines(spec.secrets_env))
        spec.secrets_env.unlink(missing_ok=True)
        if spec.aws_dir is not None:
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
                env.pop(name, None)
            env.update(AWS_CONFIG_FILE=str(spec.aws_dir / "config"), AWS_SHARED_CREDENTIALS_FILE="/dev/null")
        self._spawn(["bash", "-c", spec.command], env)

    def stop(self, grace: int) -> None:
        """SIGTERM to the group, up to `grace` seconds, then SIGKILL."""
        if not self.alive():
            return
        self.log(f"SIGTERM to the trainer; {grace}s grace before SIGKILL")
        self.signal_group(signal.SIGTERM)
        if self.wait_gone(grace):
            return
        self.note(f"trainer ignored SIGTERM for {grace}s: SIGKILL")
        self.signal_group(signal.SIGKILL)
        self.kill_strays()
        self.wait_gone(5)

    def kill_strays(self) -> None:
        """SIGKILL what is left of the tree outside the group (workers in their own sessions)."""
        if self.token and (count := kill_tree(self.token)):
            self.note(f"killed {count} trainer process(es) outside its process group (workers in their own sessions)")

    def pids(self) -> list[int]:
        """Every process of its group, for py-spy."""
        found = subprocess.run(["pgrep", "-g", str(self.pid)], capture_output=True, text=True, check=False)  # noqa: S607
        return [int(p) for p in found.stdout.split()]


class DockerTrainer(Trainer):
    runtime = "docker"

    def __init__(self, spec: TrainerSpec, log, note, *, docker: str, has_secrets: bool) -> None:
        super().__init__(spec, log, note)
        self.docker = docker
        self.has_secrets = has_secrets

    def argv(self) -> list[str]:
        spec = self.spec
        command = ["sh", "-c", spec.command] if spec.command else []
        aws = ["-e", f"AWS_REGION={spec.region}", "-e", f"AWS_DEFAULT_REGION={spec.region}"]
        aws += ["-e", "AWS_EC2_METADATA_DISABLED=true"]
        if spec.aws_dir is not None:
            aws += [
                "-v",
                f"{spec.aws_dir}:/run/training-infra/aws:ro",
                "-e",
                "AWS_CONFIG_FILE=/run/training-infra/aws/config",
            ]
        params = ["-e", f"TI_PARAMS_FILE={CONTAINER_PROGRESS}/{PARAMS_FILE}"] if write_params(spec) else []
        # --init + TINI_KILL_PROCESS_GROUP: SIGTERM reaches the trainer even behind `sh -c`.
        return [
            self.docker, "run", "--rm", "--name", CONTAINER, "--gpus", "all", "--init",
            "-e", "TINI_KILL_PROCESS_GROUP=1", "--security-opt", "no-new-privileges", "--shm-size", shm_size(),
            "-v", f"{spec.data_dir}:/data:ro", "-v", f"{spec.out_dir}:/outputs", "-v", f"{spec.ckpt_dir}:/checkpoints",
            "-v", f"{spec.progress_dir}:{CONTAINER_PROGRESS}", *params,
            "-e", f"RUN_ID={spec.run_id}", "-e", "DATA_DIR=/data", "-e", "OUTPUT_DIR=/outputs",
            "-e", "CHECKPOINT_DIR=/checkpoints", "-e", f"HEARTBEAT_FILE={spec.heartbeat_file}",
            "-e", f"TENSORBOARD_DIR=/outputs/{TENSORBOARD}",
            "-e", f"STOP_GRACE_SECONDS={spec.stop_grace_seconds}", *aws, *spec.engine_args,
            "--env-file", str(spec.trainer_env), "--env-file", str(spec.secrets_env), spec.image, *command,
        ]  # fmt: skip

    def start(self, environ: dict[str, str]) -> None:
        # In a container the shell is the init's child: on SIGTERM it exits and the container ends with it.
        command = self.spec.command
        if re.search(r"[;&|]", command) and "exec " not in command:
            self.note(
                "WARNING: TI_TRAINING_COMMAND has no exec: on SIGTERM its shell exits and the trainer dies unsaved"
            )
        subprocess.run([self.docker, "rm", "-f", CONTAINER], capture_output=True, check=False, env=environ)  # noqa: S603
        self._spawn(self.argv(), environ)
        self._forget_secrets(environ)

    def _forget_secrets(self, environ: dict[str, str]) -> None:
        """`docker run` reads its --env-file before it creates the container: once that exists, the file goes."""
        if not self.has_secrets:
            return
        for _ in range(600):
            if self.poll() is not None:
                break
            seen = subprocess.run(  # noqa: S603
                [self.docker, "container", "inspect", CONTAINER], capture_output=True, check=False, env=environ
            )
            if seen.returncode == 0:
                break
            time.sleep(0.1)
        self.spec.secrets_env.unlink(missing_ok=True)

    def stop(self, grace: int) -> None:
        if not self.alive():
            return
        self.log(f"SIGTERM to the trainer; {grace}s grace before SIGKILL")
        try:
            subprocess.run(  # noqa: S603
                [self.docker, "stop", "-t", str(grace), CONTAINER], capture_output=True, check=False, timeout=grace + 60
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            # A hung daemon: kill the `docker run` client, and let finalize save what it can.
            self.note(f"WARNING: {self.docker} stop did not answer ({error}): killing the docker client")
            self.signal_group(signal.SIGKILL)

    def pids(self) -> list[int] | None:
        """The host PIDs of every process in the container's PID namespace (`inspect .State.Pid` is a host
        PID in Docker and podman alike); not `docker top -eo pid`, which podman runs inside the container."""
        try:
            init = subprocess.run(  # noqa: S603
                [self.docker, "inspect", "--format", "{{.State.Pid}}", CONTAINER],
                capture_output=True, text=True, timeout=20, check=False,
            ).stdout.strip()  # fmt: skip
        except subprocess.TimeoutExpired:
            return None
        if not re.fullmatch(r"[1-9][0-9]*", init):
            return None
        try:
            namespace = os.readlink(f"/proc/{init}/ns/pid")
        except OSError:
            return None
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "pid") == namespace:
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return sorted(pids)
