"""One attempt on one box: setup, the trainer and its watchers, then finalize (always).

Order (docs/agent.md): logs, signals, settings and the OS deadline before any network call,
metadata and tags, image, data, checkpoints, secrets and the trainer role, trainer + watchers, then
checkpoints, logs, outputs, status.json, _SUCCESS, notice, power-off. Finalize runs in `finally`,
with a backstop timer that powers off when it hangs.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

from . import coldstart, diagnostics, gang, handover
from .aws import Aws, AwsError, Metric
from .checkpoints import AttemptFailed, Checkpoints
from .imds import Imds, ImdsError
from .logship import LogShipper
from .metrics import MetricsLog
from .progress import Progress, observe, read_heartbeat
from .runtime import CONTAINER, TENSORBOARD, DockerTrainer, ProcessTrainer, Trainer, TrainerSpec
from .secrets import assume_trainer_role, fetch_secrets, trainer_aws_config
from .settings import ISO_TIME, RUN_ID, AgentConfig, Knobs, SettingError, Settings, lenient, parse
from .status import Instance, Outcome, StopReason, build_status
from .watchers import TAG, WATCHERS, NoticeDuringFinalSync, stop_tag_reason

PROGRESS_IN_CONTAINER = "/run/training-infra/progress/"


class AgentInterrupted(Exception):
    """SIGTERM or SIGINT to the agent: the run ends as interrupted."""


class EndAttempt(Exception):
    """The attempt ends here on purpose (deadline passed, stop asked before the trainer started)."""


def utc(epoch: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if epoch is None else epoch))


def parse_deadline(value: str) -> float | None:
    if not ISO_TIME.match(value):
        return None
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


class Agent:
    def __init__(self, environ: Mapping[str, str], clock: Callable[[], float] = time.time) -> None:
        self.environ = dict(environ)
        self.clock = clock
        root = self.environ.get("TI_ROOT", "")
        self.root = root
        self.agent_dir = Path(f"{root}/opt/training-infra")
        self.state = self.agent_dir / "state"
        self.log_dir = Path(f"{root}/var/log")
        self.setup_log = self.log_dir / "training-setup.log"
        self.train_log = self.log_dir / "training.log"
        self.data_dir = Path(f"{root}/data")
        self.out_dir = Path(f"{root}/outputs")
        self.ckpt_dir = Path(f"{root}/checkpoints")
        self.progress_dir = self.state / "progress"
        self.started_epoch = int(clock())
        self.outcome: Outcome | None = None
        self.message = ""
        self.exit_code: int | None = None
        self.run_id = ""
        self.attempt = 0  # 0: not known (no answer from IMDS), so this record never overwrites a real attempt's
        self.instance = Instance(market=self.environ.get("TI_MARKET") or "spot")
        self.deadline_epoch = 0.0
        self.deadline_why = ""
        self.halt = threading.Event()
        self.stopped = threading.Event()
        self.stop_reason: StopReason | None = None
        self._stop_lock = threading.Lock()
        self._log_lock = threading.Lock()
        # Signals seen while finalizing: the handler only appends here (no lock, no I/O), `log` says them.
        self._signals: deque[str] = deque()
        self._progress_lock = threading.Lock()
        self._logs_lock = threading.Lock()  # the checkpoint watcher's log upload and finalize's
        self.progress = Progress()
        self.metrics = MetricsLog(self.state / "logs" / "metrics.jsonl", log=self.log)  # synced with the logs
        self.gpu_percent: float | None = None  # the busiest GPU at the idle watcher's last look
        self.finalizing = False
        self.trainer: Trainer | None = None
        self.trainer_started = 0.0
        self.settings: Settings | None = None
        # What finalize goes by when `parse` refused the environment: each field that parses, else its default.
        self.fallback = lenient(self.environ)
        self.imds = Imds(self.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or "http://169.254.169.254")
        self.aws = Aws(region=self.environ.get("TI_REGION", ""), environ=self.environ)
        self.shipper: LogShipper | None = None
        self.checkpoints: Checkpoints | gang.GangCheckpoints | None = None
        self.member: gang.Member | None = None  # this node's place in a multi-node run (gang.join)
        self.stale_noticed = False
        self.powered_off = False
        self.tags_unread = ""  # why IMDS would not list the instance tags (handover.py: the restore waits its bound)
        self.cold_start: coldstart.ColdStart | None = None

    # ------------------------------------------------------------ settings, even before they parsed
    @property
    def config(self) -> AgentConfig:
        return (self.settings or self.fallback).config

    @property
    def knobs(self) -> Knobs:
        return (self.settings or self.fallback).knobs

    @property
    def outputs_bucket(self) -> str:
        return self.config.outputs_bucket

    @property
    def run_prefix(self) -> str:
        return f"s3://{self.outputs_bucket}/runs/{self.run_id}"

    @property
    def attempt_prefix(self) -> str:
        node = f"/nodes/{self.member.node}" if self.member is not None else ""
        return f"{self.run_prefix}/attempts/{self.attempt}{node}"

    @property
    def log_stream(self) -> str:
        """The run's stream; in a gang, node k > 0 its own `<run>/node-<k>` (node 0 keeps the run's)."""
        return self.run_id if self.member is None or self.member.is_host else f"{self.run_id}/node-{self.member.node}"

    @property
    def image(self) -> str:
        return f"{self.config.image_uri}:{self.config.image_tag}"

    @property
    def heartbeat_host(self) -> Path:
        """The heartbeat as the agent sees it: the container's /outputs, /checkpoints and progress folder."""
        beat = self.knobs.heartbeat_file
        if beat.startswith(("/outputs/", "/checkpoints/")):
            return Path(f"{self.root}{beat}")
        if beat.startswith(PROGRESS_IN_CONTAINER):
            return self.progress_dir / beat[len(PROGRESS_IN_CONTAINER) :]
        return Path(beat)

    @property
    def trainer_heartbeat(self) -> str:
        """HEARTBEAT_FILE as the trainer was given it: the container's path, or the host's for a process."""
        return str(self.heartbeat_host) if self.knobs.runtime == "process" else self.knobs.heartbeat_file

    @property
    def heartbeat_in_checkpoints(self) -> str:
        beat = self.knobs.heartbeat_file
        return beat[len("/checkpoints/") :] if beat.startswith("/checkpoints/") else ""

    # ------------------------------------------------------------ saying things
    def log(self, message: str) -> None:
        """Never raises: a full disk or a closed stdout must not cost the status and the power-off."""
        while self._signals:
            self._write(self.setup_log, f"{utc()} [agent] {self._signals.popleft()}\n", echo=True)
        self._write(self.setup_log, f"{utc()} [agent] {message}\n", echo=True)

    def note(self, message: str) -> None:
        """Milestones also go to the training log, so the CloudWatch stream tells the whole story."""
        self.log(message)
        self._write(self.train_log, f"{utc()} [training-infra] {message}\n")

    def _write(self, path: Path, line: str, *, echo: bool = False) -> None:
        # As agent.sh's `tee`: a line that cannot be written is lost, the agent goes on.
        with self._log_lock:
            try:
                with open(path, "a", encoding="utf-8", errors="replace") as out:
                    out.write(line)
            except (OSError, ValueError):
                pass
            if echo:
                try:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass

    def fail(self, message: str) -> None:
        raise AttemptFailed(message)

    def retry(self, what: str, action: Callable[[], bool]) -> bool:
        """Bounded attempts with exponential backoff on top of the AWS CLI's own retries."""
        attempts = self.knobs.retry_attempts or 1
        base = self.knobs.retry_base_seconds
        for n in range(1, attempts + 1):
            try:
                if action():
                    return True
            except (OSError, AwsError, ImdsError, ValueError) as error:
                self.log(f"{what}: {error}")
            if n >= attempts:
                self.log(f"{what} failed after {n} attempts")
                return False
            pause = base * 2 ** (n - 1)
            self.log(f"{what} failed (attempt {n} of {attempts}); retrying in {pause}s")
            time.sleep(pause)
        return False

    # ------------------------------------------------------------ the stop: first reason wins
    def request_stop(self, outcome: Outcome, message: str, grace: int) -> bool:
        with self._stop_lock:
            if self.stop_reason is not None:
                return False
            self.stop_reason = StopReason(outcome, message, grace)
            self.stopped.set()  # before any I/O: the reason is taken, the trainer must stop whatever follows
        self.note(f"{message}: stopping the trainer (outcome {outcome.value})")
        return True

    def cut_off_checkpoints(self, at: float, why: str) -> None:
        """The handover deadline (handover.notice_deadline): no checkpoint write after it. Single-node only: a gang's
        members get no replacement on a notice (the supervisor's gang.py replaces them)."""
        if isinstance(self.checkpoints, Checkpoints):
            self.checkpoints.cut_off(at, why)

    def trainer_alive(self) -> bool:
        return self.trainer is not None and self.trainer.alive()

    def _on_signal(self, signum: int, _frame: object) -> None:
        """No lock and no I/O here: the signal may land while this thread holds the log lock."""
        name = signal.Signals(signum).name
        if self.finalizing:
            self._signals.append(f"{name} during finalize: carrying on (the backstop still powers off)")
            return
        if self.outcome is None:
            self.outcome, self.message = Outcome.INTERRUPTED, f"agent received {name} (instance shutting down?)"
        raise AgentInterrupted(name)

    # ------------------------------------------------------------ the run
    def main(self) -> int:
        """Always ends in finalize and the power-off, whatever raised (setup included)."""
        try:
            try:
                signal.signal(signal.SIGTERM, self._on_signal)
                signal.signal(signal.SIGINT, self._on_signal)
                threading.excepthook = self._thread_error
                self.prepare()
                self.run()
            except AttemptFailed as error:
                self.outcome, self.message = Outcome.FAILED, str(error)
                self.log(f"FAILED: {error}")
            except AgentInterrupted as signalled:
                self.log(f"agent received {signalled}")
            except EndAttempt:
                pass
            except BaseException as error:  # noqa: BLE001 - whatever happens, finalize reports it
                self.log("agent error:\n" + traceback.format_exc().rstrip())
                self.message = self.message or f"agent error: {error!r}"
            finally:
                self.finalize()
        except BaseException:  # noqa: BLE001 - a signal inside the handlers above: still power off
            self.log("agent error after finalize:\n" + traceback.format_exc().rstrip())
            if not self.powered_off:
                self.power_off()
        return 0

    def prepare(self) -> None:
        os.umask(0o022)
        shutil.rmtree(self.state, ignore_errors=True)
        for folder in (self.log_dir, self.state, self.data_dir, self.out_dir, self.ckpt_dir):  # logs first
            folder.mkdir(parents=True, exist_ok=True)
        self.progress_dir.mkdir()
        self.progress_dir.chmod(0o1777)  # a trainer image with a non-root USER beats too
        (self.log_dir / "training-diagnostics.txt").unlink(missing_ok=True)
        self.train_log.touch()

    def _thread_error(self, args: threading.ExceptHookArgs) -> None:
        """A thread's crash goes to the setup log, not only to cloud-init's."""
        name = args.thread.name if args.thread is not None else "a thread"
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)).rstrip()
        self.log(f"WARNING: {name} crashed:\n{text}")

    def run(self) -> None:
        self.log(f"training-infra agent starting (runtime {self.knobs.runtime}, root '{self.root or '/'}')")
        try:
            self.settings = parse(self.environ)
        except SettingError as error:
            self.fail(str(error))
        config = self.config
        if config.deadline_at:
            if not self.set_deadline(config.deadline_at):
                self.fail(
                    f"TI_DEADLINE_AT='{config.deadline_at}' is not allowed: use an ISO 8601 UTC time such as "
                    "2026-11-29T18:00:00Z"
                )
        else:
            self.deadline_epoch = self.started_epoch + config.max_runtime_seconds
            self.deadline_why = f"max runtime of {config.max_runtime_seconds}s"
        # --env values are not secrets, but they are the trainer's business only.
        self._private(self.state / "trainer.env", "".join(f"{line}\n" for line in self.settings.extra_env))
        self.arm_os_deadline()  # before any network call can hang (a deadline tag moves it later)
        self.read_metadata()
        self.set_run_id()
        i = self.instance
        self.log(f"run {self.run_id} attempt {self.attempt} on {i.instance_id} ({i.instance_type}, {i.market}, "
                 f"{i.availability_zone}, {i.region})")  # fmt: skip
        # The first line of this attempt in the run's one log stream: `logs RUN` shows where it starts.
        self.note(f"attempt {self.attempt} started on {i.instance_type} in {i.availability_zone} ({i.market})")
        gang.join(self)  # nodes > 1: waits for this node's place in the gang
        self.open_log_stream()
        self.end_if_over()
        coldstart.start(self)  # image, data and checkpoints at once (issue 29)
        self.end_if_over()
        secrets_env = self.state / "secrets.env"
        reader = config.secrets_reader_role_arn
        if not self.retry(
            "secrets",
            lambda: fetch_secrets(
                self.aws, self.settings.secrets, reader_role=reader, run_id=self.run_id, out=secrets_env, log=self.log
            ),
        ):
            self.fail("could not read TI_SECRETS (see the setup log)")
        if config.trainer_role_arn:
            if not self.retry("trainer role", self.assume_trainer_role):
                self.fail(f"could not assume {config.trainer_role_arn}")
            docker = self.settings.runtime.value == "docker"
            trainer_aws_config(self.state / "aws", "/run/training-infra/aws" if docker else str(self.state / "aws"))
        self.start_trainer()
        for watcher in WATCHERS:
            watcher(self).start()
        gang.start_watchers(self)
        self.wait_for_trainer()

    def _private(self, path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)

    def cli_ok(self, *args: str, timeout: float | None = None) -> bool:
        done = self.aws.cli(*args, timeout=timeout)
        if not done.ok and (done.stderr or done.stdout):
            self.log((done.stderr or done.stdout).strip())
        return done.ok

    # ------------------------------------------------------------ the deadline
    def set_deadline(self, value: str) -> bool:
        epoch = parse_deadline(value)
        if epoch is None:
            return False
        self.deadline_epoch, self.deadline_why = epoch, f"the run's deadline {value}"
        return True

    def arm_os_deadline(self) -> None:
        """shutdown -h +N at the deadline, rounded up to minutes; one minute when it has passed."""
        left = self.deadline_epoch - self.clock()
        minutes = 1 if left <= 0 else math.ceil(left / 60)
        try:
            done = subprocess.run(  # noqa: S603
                [self.knobs.shutdown_bin, "-h", f"+{minutes}", f"training-infra: {self.deadline_why} reached"],
                capture_output=True, timeout=30, check=False,
            )  # fmt: skip
            armed = done.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            armed = False
        if armed:
            self.log(f"OS deadline set: power-off in {minutes} min ({self.deadline_why})")
        else:
            self.log("WARNING: could not schedule the OS deadline; the agent deadline and the cloud reaper remain")

    # ------------------------------------------------------------ instance metadata (IMDSv2)
    def read_metadata(self) -> None:
        endpoint = self.imds.endpoint
        if not self.retry("instance metadata token", lambda: bool(self.imds.token(renew=True))):
            self.fail(f"instance metadata (IMDSv2) at {endpoint} did not answer")

        def get(path: str, default: str) -> str:
            try:
                return self.imds.get(path) or default
            except ImdsError:
                return default

        instance_id = get("meta-data/instance-id", "")
        if not instance_id:
            self.fail(f"could not read instance-id from IMDS at {endpoint}")
        zone = get("meta-data/placement/availability-zone", "unknown")
        region = self.config.region or get("meta-data/placement/region", "") or zone[:-1]
        self.instance = Instance(
            instance_id=instance_id,
            instance_type=get("meta-data/instance-type", "unknown"),
            availability_zone=zone,
            market=get("meta-data/instance-life-cycle", self.config.market),
            region=region,
        )
        self.aws.region = region
        self.read_tags()

    def tag(self, name: str) -> str | None:
        return self.imds.get(f"meta-data/tags/instance/{TAG}:{name}")

    def read_tags(self) -> None:
        """Which attempt this is and the run's deadline, from the instance tags (404: tags off or none). Another
        IMDS error is asked again, for up to the handover bound; if it stays, the attempt ends here, before the
        trainer starts: an attempt that does not know its number would write its records where the supervisor
        does not read them (a success seen as "ended without a status.json") and cannot know what it replaces."""
        patience = handover.WAIT_SECONDS
        try:
            keys = handover.read_tag(lambda: self.imds.get("meta-data/tags/instance"), patience=patience) or ""
            keys = keys.splitlines()
            value = None
            if f"{TAG}:attempt" in keys:
                value = handover.read_tag(lambda: self.tag("attempt"), patience=patience) or ""
        except ImdsError as error:
            self.attempt, self.tags_unread = 0, str(error)  # 0: unknown, its records overwrite no attempt's
            self.fail(f"instance tags not readable from IMDS for {patience} s ({error}): attempt unknown, so no "
                      "trainer starts; the supervisor relaunches this run as for any failed box")  # fmt: skip
        self.attempt = 1
        if value is not None:
            if not re.fullmatch(r"[1-9][0-9]{0,5}", value):
                self.attempt = 0
                self.fail(f"tag {TAG}:attempt='{value}' is not allowed: use a whole number from 1")
            self.attempt = int(value)
        if not self.config.deadline_at and f"{TAG}:deadline" in keys:
            value = self.tag("deadline") or ""
            if not self.set_deadline(value):
                self.fail(f"tag {TAG}:deadline='{value}' is not allowed: use an ISO 8601 UTC time")
            self.arm_os_deadline()  # the tag's instant replaces the max-runtime deadline set before

    def stop_requested(self) -> tuple[Outcome, str] | None:
        try:
            value = self.tag("stop")
        except ImdsError:
            return None
        return None if value is None else stop_tag_reason(value)

    def set_run_id(self) -> None:
        run_id = self.config.run_id or f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(self.started_epoch))}-" + (
            self.instance.instance_id
        )
        # A rejected TI_RUN_ID (finalize still names the run) must not reach an S3 key.
        if not RUN_ID.match(run_id):
            instance = self.instance.instance_id
            if instance == "unknown":
                try:
                    instance = self.imds.get("meta-data/instance-id") or ""
                except ImdsError:
                    instance = ""
            run_id = "invalid-" + (instance or time.strftime("unknown-%Y%m%d-%H%M%S", time.gmtime()))
        self.run_id = run_id.lower()
        self.checkpoints = Checkpoints(
            aws=self.aws,
            folder=self.ckpt_dir,
            state_dir=self.state,
            bucket=self.outputs_bucket,
            run_id=self.run_id,
            skip=self.heartbeat_in_checkpoints,
            log=self.log,
            note=self.note,
        )

    # ------------------------------------------------------------ CloudWatch
    def open_log_stream(self) -> None:
        group = self.config.log_group
        if not group:
            self.log("no TI_LOG_GROUP: training output stays in S3 only")
            return
        stream = self.log_stream
        try:
            self.aws.create_log_stream(group, stream)
        except AwsError as error:
            if error.code != "ResourceAlreadyExistsException":
                self.log(f"WARNING: cannot open log stream {group}/{stream} (training output stays in S3): {error}")
                return
        self.shipper = LogShipper(self.aws, self.train_log, group, stream, lambda: int(time.time() * 1000))

    def put_metrics(self, metrics: list[Metric], warning: str) -> None:
        try:
            self.aws.put_metrics(self.config.metric_namespace, metrics)
        except (AwsError, OSError) as error:
            self.log(f"WARNING: {warning}: {error}")

    # ------------------------------------------------------------ stop before the trainer starts
    def end_if_over(self) -> None:
        """No training once the deadline has passed or the supervisor asked to stop."""
        if self.deadline_epoch <= self.clock():
            self.outcome, self.message = Outcome.DEADLINE, f"{self.deadline_why} passed before the trainer started"
        elif (stop := self.stop_requested()) is not None:
            self.outcome, self.message = stop[0], f"{stop[1]} before the trainer started"
        else:
            return
        self.note(self.message)
        raise EndAttempt

    # ------------------------------------------------------------ image and checkpoints
    def fetch_image(self) -> bool:
        uri, tag = self.config.image_uri, self.config.image_tag
        registry, _, repo = uri.partition("/")
        docker = self.settings.runtime.value == "docker"
        registry_id = registry.split(".")[0]
        id_args = ["--registry-id", registry_id] if re.fullmatch(r"[0-9]{12}", registry_id) else []
        timeout = self.knobs.pull_timeout_seconds
        if re.search(r"\.dkr\.ecr\..*\.amazonaws\.com", registry):
            password = self.aws.cli("ecr", "get-login-password")
            if not password.ok:
                self.log(password.stderr)
                return False
            if docker:
                # A registry that accepts the connection and never answers would hold a login for ever, too.
                login = self.engine("login", "--username", "AWS", "--password-stdin", registry,
                                    stdin=password.stdout.strip() + "\n", timeout=timeout)  # fmt: skip
                if login is None or login.returncode != 0:
                    return False
        if docker:
            # A stalled pull never ends by itself, and the deadline watcher only starts with the trainer.
            pulled = self.engine("pull", "--quiet", self.image, timeout=timeout)
            if pulled is None:
                self.log(f"docker pull stalled: cut after {timeout}s")
                return False
            return pulled.returncode == 0
        if id_args or ".dkr.ecr." in registry:
            # No Docker engine here: prove the image exists, then run the same command directly.
            found = self.aws.cli(
                "ecr", "describe-images", "--repository-name", repo, *id_args, "--image-ids", f"imageTag={tag}",
                "--query", "imageDetails[0].imageDigest", "--output", "text",
            )  # fmt: skip
            if not found.ok:
                self.log(found.stderr)
                return False
            self.log(
                f"image {self.image} is in ECR ({found.stdout.strip()}); the process runtime runs its command directly"
            )
        return True

    def engine(self, *args: str, stdin: str | None = None, timeout: float) -> subprocess.CompletedProcess | None:
        """A docker command, its output into the setup log; None when it was cut after `timeout`."""
        try:
            done = subprocess.run(  # noqa: S603
                [self.knobs.docker, *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return None
        output = (done.stdout + done.stderr).strip()
        if output and (done.returncode != 0 or args[0] != "login"):
            self.log(output)
        return done

    def _restore(self) -> bool:
        assert self.checkpoints is not None
        self.checkpoints.restore()
        return True

    def upload_logs(self) -> bool:
        with self._logs_lock:
            logs = self.state / "logs"
            logs.mkdir(exist_ok=True)
            for path in (self.setup_log, self.train_log, self.log_dir / "training-diagnostics.txt"):
                try:
                    if path.is_file():
                        shutil.copyfile(path, logs / path.name)
                except OSError as error:  # a full disk: the older copy (if any) still goes up
                    self.log(f"WARNING: {path.name} not copied for upload: {error}")
            synced = self.cli_ok("s3", "sync", f"{logs}/", f"{self.attempt_prefix}/logs/", "--only-show-errors")
            board = self.out_dir / TENSORBOARD  # only a trainer that writes $TENSORBOARD_DIR costs a request
            if board.is_dir():
                self.cli_ok("s3", "sync", f"{board}/", f"{self.run_prefix}/tensorboard/", "--only-show-errors")
            return synced

    # ------------------------------------------------------------ progress
    def observe_progress(self, now: float) -> Progress:
        with self._progress_lock:
            beat = read_heartbeat(self.heartbeat_host)
            self.progress, said = observe(self.progress, beat, now, since=self.trainer_started)
            self.metrics.record(self.progress, beat.text if beat else "", now, self.gpu_percent)  # watch's history
        if said:
            self.log(f"heartbeat file {self.heartbeat_host} {said}")
        return self.progress

    def upload_progress(self) -> None:
        body = (json.dumps(self.progress.record()) + "\n").encode()
        try:
            key = f"{self.attempt_prefix}/progress.json".removeprefix(f"s3://{self.outputs_bucket}/")
            self.aws.put_object(self.outputs_bucket, key, body)
        except (AwsError, OSError) as error:
            self.log(f"WARNING: progress.json not uploaded: {error}")

    def collect_diagnostics(self) -> None:
        assert self.trainer is not None
        note = diagnostics.collect(
            out=self.log_dir / "training-diagnostics.txt",
            nvidia_smi=self.knobs.nvidia_smi,
            pids=self.trainer.pids(),
            train_log=self.train_log,
            env_path=self.environ.get("PATH", os.defpath),
        )
        self.note(note)

    # ------------------------------------------------------------ the freshness notice, once per run
    def check_checkpoint_freshness(self) -> None:
        """The last complete sync older than two intervals plus the last upload's time while the trainer
        wrote newer checkpoints: said once per attempt (log, CheckpointStale), once per run on the topic."""
        assert self.checkpoints is not None
        if self.stale_noticed:
            return
        newest = self.checkpoints.newest_local()
        if newest is None:
            return
        state = self.checkpoints.state
        complete = state.complete_as_of if state.complete_as_of is not None else self.trainer_started
        now = self.clock()
        if not (
            int(newest) > complete
            and now - complete > 2 * self.config.checkpoint_sync_seconds + state.last_sync_seconds
        ):
            return
        self.stale_noticed = True
        words = (
            f"the last complete checkpoint in {self.checkpoints.url}/ is {int(now - complete)}s old while the trainer"
            " wrote newer ones locally (or rewrites its files during every upload): uploads are failing"
        )
        self.put_metrics([Metric("CheckpointStale", 1, "Count", (("RunId", self.run_id),))], "metric not sent")
        topic = self.config.alerts_topic_arn
        if not topic:
            self.note(f"WARNING: {words} (said once; no alert topic)")
        elif self.run_was_told("checkpoint-stale"):
            self.note(f"WARNING: {words} (said once; an earlier attempt of this run sent the notice)")
        elif self.aws.cli(
            "sns", "publish", "--topic-arn", topic, "--message", f"Run {self.run_id}: {words}.",
            "--subject", f"training-infra run {self.run_id}: checkpoints are not reaching S3",
        ).ok:  # fmt: skip
            self.run_told("checkpoint-stale", words)
            self.note(f"WARNING: {words} (said once; notice sent)")
        else:
            self.note(
                f"WARNING: {words} (said once; the notice could not be sent, a later attempt of this run tries again)"
            )

    def notice_key(self, what: str) -> str:
        # The run's deadline: every attempt of a launch shares it; `launch --resume` sets a new one.
        return f"runs/{self.run_id}/notices/{what}-{int(self.deadline_epoch)}"

    def run_was_told(self, what: str) -> bool:
        """Listed, not read: the instance role may list runs/, but reading a missing key answers 403."""
        found = self.aws.cli(
            "s3api", "list-objects-v2", "--bucket", self.outputs_bucket, "--prefix", self.notice_key(what),
            "--query", "length(Contents || `[]`)", "--output", "text",
        )  # fmt: skip
        count = found.stdout.strip()
        if not found.ok or not count.isdigit():
            why = " ".join((found.stderr or count).split())
            self.log(f"WARNING: cannot tell whether the run was told of {what} ({why}): this attempt tells it")
            return False
        return int(count) > 0

    def run_told(self, what: str, words: str) -> None:
        try:
            self.aws.put_object(self.outputs_bucket, self.notice_key(what), (words + "\n").encode())
        except (AwsError, OSError):
            self.log(f"WARNING: the {what} notice is not recorded in S3: a later attempt may send it again")

    # ------------------------------------------------------------ the trainer
    def assume_trainer_role(self) -> bool:
        return assume_trainer_role(
            self.aws,
            role_arn=self.config.trainer_role_arn,
            run_id=self.run_id,
            seconds=self.knobs.trainer_session_seconds,
            aws_dir=self.state / "aws",
            log=self.log,
        )

    def start_trainer(self) -> None:
        config, knobs = self.config, self.knobs
        command, engine_args = gang.launch(self, config.training_command)
        spec = TrainerSpec(
            command=command,
            image=self.image,
            run_id=self.run_id,
            region=self.aws.region,
            data_dir=self.data_dir,
            out_dir=self.out_dir,
            ckpt_dir=self.ckpt_dir,
            progress_dir=self.progress_dir,
            heartbeat_host=self.heartbeat_host,
            heartbeat_file=knobs.heartbeat_file,
            stop_grace_seconds=config.stop_grace_seconds,
            trainer_env=self.state / "trainer.env",
            secrets_env=self.state / "secrets.env",
            aws_dir=self.state / "aws" if config.trainer_role_arn else None,
            train_log=self.train_log,
            engine_args=engine_args,
        )
        self.trainer_started = int(self.clock())
        runtime = self.settings.runtime.value
        self.note(f"starting trainer ({runtime} runtime, image {self.image}, run {self.run_id})")
        if runtime == "docker":
            self.trainer = DockerTrainer(
                spec, self.log, self.note, docker=knobs.docker, has_secrets=bool(knobs.secrets)
            )
        else:
            self.trainer = ProcessTrainer(spec, self.log, self.note)
        env = self.aws.cli_env()
        self.trainer.start(env)
        gang.check_placement(self, engine_args, CONTAINER)

    def wait_for_trainer(self) -> None:
        trainer = self.trainer
        assert trainer is not None
        while trainer.poll() is None:
            if self.stopped.wait(0.5):
                assert self.stop_reason is not None
                trainer.stop(self.stop_reason.grace)
                break
        code = trainer.wait()
        self.exit_code = 128 - code if code < 0 else code
        # The trainer's children may still be writing their last checkpoint: they get the grace period,
        # then finalize stops what is left of the group (a stray child must not hold the box up).
        trainer.wait_gone(self.config.stop_grace_seconds)
        if self.stop_reason is not None:
            self.outcome, self.message = self.stop_reason.outcome, self.stop_reason.message
            # `docker stop` kills silently after the grace period: say so, as the process runtime does.
            if isinstance(trainer, DockerTrainer) and self.exit_code == 137:
                self.note("trainer ignored SIGTERM for the grace period: killed")
        elif self.exit_code == 0:
            self.outcome, self.message = Outcome.SUCCEEDED, "trainer finished"
        else:
            self.outcome, self.message = Outcome.FAILED, f"trainer exited with code {self.exit_code}"

    # ------------------------------------------------------------ the end of every attempt
    def power_off(self) -> None:
        """The last thing the agent does; the command runs even when saying so fails."""
        self.powered_off = True
        command = self.knobs.poweroff_cmd
        if "halt" in command:
            self.log(f"not powering off with TI_POWEROFF_CMD='{command}'")
            return
        if not self.config.auto_shutdown:
            self.log("auto_shutdown is false: leaving the instance running (the OS deadline still applies)")
            return
        try:
            self.log(f"powering off: {command}")
        finally:
            if not _run_poweroff(command, self.setup_log):
                self.log("WARNING: power-off command failed")

    def _backstop(self) -> None:
        try:
            self.log("finalize is stuck: powering off anyway")
        finally:
            _run_poweroff(self.knobs.poweroff_cmd, self.setup_log)

    def finalize(self) -> None:
        self.finalizing = True
        backstop = None
        try:
            if self.config.auto_shutdown and "halt" not in self.knobs.poweroff_cmd:
                # Not a daemon: if the main thread dies, the interpreter still waits for it to power off.
                backstop = threading.Timer(self.knobs.finalize_timeout_seconds, self._backstop)
                backstop.start()
            self._finalize()
        except BaseException:  # noqa: BLE001 - the box must still power off
            self.log("finalize error:\n" + traceback.format_exc().rstrip())
        finally:
            try:
                self.power_off()
            finally:
                if backstop is not None:
                    backstop.cancel()

    def final_checkpoint_sync(self) -> bool:
        """The final sync, retried, but never past the handover deadline (the cut-off is said in one log line)."""
        assert self.checkpoints is not None
        checkpoints, synced = self.checkpoints, [False]

        def once() -> bool:
            if isinstance(checkpoints, Checkpoints) and checkpoints.past_cut_off():
                return True  # nothing may be written now: no more tries
            synced[0] = checkpoints.sync()
            return synced[0]

        self.retry("final checkpoint sync", once)
        return synced[0]

    def _final_sync_watching_for_a_notice(self) -> bool:
        """The final sync of a single-node run, with the spot notice still read while it runs (a notice now starts a
        replacement that restores after the notice's deadline: this box writes nothing after it)."""
        if not isinstance(self.checkpoints, Checkpoints):
            return self.final_checkpoint_sync()
        done = threading.Event()
        watcher = NoticeDuringFinalSync(self, done)
        watcher.start()
        try:
            return self.final_checkpoint_sync()
        finally:
            done.set()
            watcher.join(timeout=5)

    def _finalize(self) -> None:
        self.halt.set()
        try:
            (self.state / "secrets.env").unlink(missing_ok=True)
        except OSError as error:
            self.log(f"WARNING: secrets.env not removed: {error}")
        if self.checkpoints is not None and (ended := self.checkpoints.end_in_flight()):
            self.log(f"ended {ended} in-flight checkpoint upload call(s): the final sync comes next")
        grace = self.config.stop_grace_seconds
        if self.trainer is not None and self.trainer.alive():
            if self.outcome is None:
                self.outcome = Outcome.FAILED
                self.message = self.message or "agent stopped before the trainer finished"
            self.trainer.stop(grace)
        if self.outcome is None:
            self.outcome = Outcome.FAILED
            self.message = self.message or "agent exited before the trainer finished"
        ended = int(self.clock())
        if not self.run_id:
            self.set_run_id()
        assert self.checkpoints is not None
        exit_text = "none" if self.exit_code is None else str(self.exit_code)
        self.note(f"run {self.run_id} finished: outcome={self.outcome.value} exit_code={exit_text} {self.message}")
        started = bool(self.trainer_started)
        if started and not self._final_sync_watching_for_a_notice():
            cut = isinstance(self.checkpoints, Checkpoints) and self.checkpoints.past_cut_off()
            self.message += " (final checkpoint sync cut off at the handover deadline)" if cut else (
                " (final checkpoint sync failed)")  # fmt: skip
        # Interrupted: the box may vanish any second, so logs go up before the (larger) outputs.
        if self.outcome is Outcome.INTERRUPTED:
            self.upload_logs()
        if self.shipper is not None:
            try:
                self.shipper.ship(final=True)
            except (AwsError, OSError) as error:
                self.log(f"WARNING: final CloudWatch Logs upload failed: {error}")
        if started:
            out = (f"{self.out_dir}/", f"{self.run_prefix}/outputs/")
            if not self.retry(
                "outputs upload", lambda: self.cli_ok("s3", "sync", *out, "--no-follow-symlinks", "--only-show-errors")
            ):
                if self.outcome is Outcome.SUCCEEDED:
                    self.outcome = Outcome.FAILED
                self.message += " (outputs upload failed)"
            # The trainer's last beats since the progress watcher's last look.
            self.observe_progress(self.clock())
            self.upload_progress()
        status = build_status(
            run_id=self.run_id,
            attempt=self.attempt,
            outcome=self.outcome,
            exit_code=self.exit_code,
            started_at=utc(self.started_epoch),
            ended_at=utc(ended),
            duration_seconds=ended - self.started_epoch,
            instance=self.instance,
            hourly_price_usd=self.config.hourly_price_usd,
            image=self.image,
            message=self.message,
            progress=self.progress.record(),
            cold_start=self.cold_start.record() if self.cold_start else None,
        )
        path = self.state / "status.json"
        body = json.dumps(status, indent=2) + "\n"
        try:
            path.write_text(body)
            written = True
        except OSError as error:  # a full disk: the record goes up from memory instead
            self.log(f"WARNING: {path} not written ({error}): uploading it from memory")
            written = False
        self.log(f"status: {body.replace(chr(10), '')}")
        # The attempt's own record first (the supervisor reads it), then the run's summary (the CLI's).
        succeeded = self.outcome is Outcome.SUCCEEDED

        def upload(what: str, url: str) -> bool:
            if written:
                return self.retry(what, lambda: self.cli_ok("s3", "cp", str(path), url, "--only-show-errors"))
            key = url.removeprefix(f"s3://{self.outputs_bucket}/")
            return self.retry(what, lambda: self.aws.put_object(self.outputs_bucket, key, body.encode()) or True)

        # In a gang each node writes its own record; node 0 alone the run's summary, _SUCCESS and latest/.
        summary = self.member is None or self.member.is_host
        if not (
            upload("status upload", f"{self.attempt_prefix}/status.json")
            and (not summary or upload("run summary upload", f"{self.run_prefix}/status.json"))
        ):
            self.log("WARNING: status.json not uploaded")
        elif succeeded and not summary:
            if not self.upload_logs():
                self.log("WARNING: log upload failed")
        elif succeeded:
            if not self.upload_logs():
                self.log("WARNING: log upload failed")
            marker = self.state / "_SUCCESS"
            marker.write_bytes(b"")
            if self.cli_ok("s3", "cp", str(marker), f"{self.run_prefix}/_SUCCESS", "--only-show-errors"):
                self.log(f"wrote {self.run_prefix}/_SUCCESS")
                if not self.refresh_latest():
                    self.log("WARNING: runs/latest/ not refreshed")
            else:
                self.log("WARNING: _SUCCESS not written")
        if not succeeded and not self.upload_logs():
            self.log("WARNING: log upload failed")
        notice = threading.Thread(target=self.publish_notice, args=(status,), daemon=True)
        notice.start()
        self.put_metrics([Metric("RunsFinished", 1, "Count", (("Outcome", self.outcome.value),))], "metric not sent")
        notice.join(timeout=120)

    def refresh_latest(self) -> bool:
        """runs/latest/ mirrors this run; its _SUCCESS again goes last."""
        latest = f"s3://{self.outputs_bucket}/runs/latest"
        self.cli_ok("s3", "rm", f"{latest}/_SUCCESS", "--only-show-errors")
        return self.cli_ok(
            "s3", "sync", f"{self.run_prefix}/", f"{latest}/", "--delete", "--exclude", "_SUCCESS", "--only-show-errors"
        ) and self.cli_ok("s3", "cp", f"{self.run_prefix}/_SUCCESS", f"{latest}/_SUCCESS", "--only-show-errors")

    def publish_notice(self, status: dict) -> None:
        topic = self.config.alerts_topic_arn
        if not topic:
            return
        i, code = self.instance, "none" if self.exit_code is None else str(self.exit_code)
        message = (
            f"Training run {self.run_id} on {i.instance_type} ({i.market}, {i.availability_zone}, {i.instance_id})"
            f" ended: {self.outcome.value}, exit code {code}, after {status['duration_seconds'] // 60} min, estimated"
            f" cost ${status['estimated_cost_usd']}. {self.message} Results: {self.run_prefix}/"
        )
        subject = f"training-infra run {self.run_id}: {self.outcome.value}"
        if not self.aws.cli("sns", "publish", "--topic-arn", topic, "--subject", subject, "--message", message).ok:
            self.log("WARNING: notice not published")


def _run_poweroff(command: str, log: Path | None = None) -> bool:
    """The command's own output goes to the setup log too (when it can be opened: a full disk must not stop it)."""
    try:
        out = open(log, "ab") if log is not None else None  # noqa: SIM115 - closed below
    except OSError:
        out = None
    try:
        return subprocess.run(["bash", "-c", command], stdout=out, stderr=out, check=False).returncode == 0  # noqa: S603,S607
    except OSError:
        return False
    finally:
        if out is not None:
            out.close()


def main() -> int:
    """Even a crash in Agent() powers off (the bootstrap `exec`s this: nothing else is left to)."""
    try:
        agent = Agent(os.environ)
    except BaseException:  # noqa: BLE001 - the box must not run until the OS deadline
        text = f"{utc()} [agent] agent error before its run:\n{traceback.format_exc()}"
        sys.stderr.write(text)
        try:
            with open(f"{os.environ.get('TI_ROOT', '')}/var/log/training-setup.log", "a", encoding="utf-8") as out:
                out.write(text)
        except OSError:
            pass
        command = os.environ.get("TI_POWEROFF_CMD") or "shutdown -h now"
        if os.environ.get("TI_AUTO_SHUTDOWN") != "false" and "halt" not in command:
            _run_poweroff(command)
        return 1
    return agent.main()
