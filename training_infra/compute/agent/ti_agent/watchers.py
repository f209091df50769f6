"""The watchers: one thread each, sharing the agent's one stop (the first reason wins) and its halt event.

A gang member (issue 25) runs the same watchers plus a rendezvous: each watcher only asks the agent
to stop (`agent.request_stop`), and the agent stops its own trainer, so a watcher never needs to
know which runtime, or how many nodes, there are.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from typing import TYPE_CHECKING

from . import handover
from .aws import AwsError, Metric
from .imds import ImdsError
from .status import Outcome

if TYPE_CHECKING:
    from .agent import Agent

SPOT_GRACE_CAP = 80  # a spot notice gives 120 s: leave room to flush after the grace period
TAG = "training-infra"
ERROR_LOG_SECONDS = 300  # a tick that keeps failing is said once, then once per this many seconds


class Watcher(threading.Thread):
    """Calls `tick` every `every` seconds until the agent halts or `tick` says it is done (True).

    A tick that raises is one failed look, not the end of the watcher: a checkpoint folder rotated
    under a walk, or IMDS cut mid-answer, must not silently end the syncs or the spot watch for the run.
    """

    every: float = 1.0
    look_at_start = False  # True: the first look comes at once, not after one period

    def __init__(self, agent: Agent) -> None:
        super().__init__(name=type(self).__name__, daemon=True)
        self.agent = agent
        self.errors = ErrorLog(agent, self.name)

    def run(self) -> None:
        look = self.look_at_start
        while look or not self.agent.halt.wait(self.pause()):
            look = False
            try:
                if self.tick():
                    return
            except Exception as error:  # noqa: BLE001 - said (rate-limited), and the next look comes
                self.errors.failed(error, f"looks again in {self.pause():g}s")

    def pause(self) -> float:
        return self.every

    def tick(self) -> bool:
        raise NotImplementedError


class NoticeDuringFinalSync(threading.Thread):
    """The spot notice read on while the final checkpoint sync runs (the watchers stop at halt, and that sync follows
    every trainer end): the supervisor starts a replacement on the notice, which restores after the notice's
    deadline, so the sync must stop writing then too. At the deadline the sync's in-flight AWS CLI calls are ended;
    no write starts after it (Checkpoints.cut_off). Stops when `done` is set (the sync returned)."""

    def __init__(self, agent: Agent, done: threading.Event) -> None:
        super().__init__(name=type(self).__name__, daemon=True)
        self.agent, self.done = agent, done
        self.every = agent.config.spot_poll_seconds

    def run(self) -> None:
        checkpoints = self.agent.checkpoints
        first = True
        while not self.done.wait(0 if first else self.every):
            first = False
            if getattr(checkpoints, "cut_off_at", None) is not None:
                return  # the notice came before halt: the sync already writes within its deadline
            try:
                action = self.agent.imds.get("meta-data/spot/instance-action")
            except ImdsError:
                continue
            if action is None:
                continue
            deadline = handover.notice_deadline(action, time.time())
            self.agent.cut_off_checkpoints(deadline, "spot notice during the final sync")
            if not self.done.wait(max(0.0, deadline - time.time())) and checkpoints is not None:
                ended = checkpoints.end_in_flight()
                self.agent.log(f"spot notice during the final sync: {ended} checkpoint upload call(s) ended at its "
                               "deadline (the replacement restores after it)")  # fmt: skip
            return


class ErrorLog:
    """The first error of a kind at once, then at most one line per ERROR_LOG_SECONDS with a count."""

    def __init__(self, agent: Agent, name: str, clock=time.monotonic) -> None:
        self.agent, self.name, self.clock = agent, name, clock
        self.said_at: float | None = None
        self.quiet = 0

    def failed(self, error: BaseException, then: str) -> None:
        now = self.clock()
        if self.said_at is not None and now - self.said_at < ERROR_LOG_SECONDS:
            self.quiet += 1
            return
        more = f"; {self.quiet} more failures not logged" if self.quiet else ""
        self.said_at, self.quiet = now, 0
        self.agent.log(f"WARNING: {self.name} failed: {type(error).__name__}: {error}{more}; it {then}")


class SpotWatcher(Watcher):
    """The spot interruption notice (and the rebalance recommendation) from IMDS, every poll."""

    look_at_start = True

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.every = agent.config.spot_poll_seconds
        self.grace = min(agent.config.stop_grace_seconds, SPOT_GRACE_CAP)
        self.rebalanced = False

    def tick(self) -> bool:
        try:
            action = self.agent.imds.get("meta-data/spot/instance-action")
            if action is not None:
                # The supervisor starts a replacement on this notice: no checkpoint write after its action time.
                self.agent.cut_off_checkpoints(handover.notice_deadline(action, time.time()), "spot notice")
                self.agent.request_stop(Outcome.INTERRUPTED, f"spot interruption notice {action}", self.grace)
                return True
            if self.rebalanced:
                return False
            body = self.agent.imds.get("meta-data/events/recommendations/rebalance")
        except ImdsError:
            return False
        if body is None:
            return False
        self.rebalanced = True
        if self.agent.config.stop_on_rebalance:
            self.agent.request_stop(Outcome.INTERRUPTED, f"rebalance recommendation {body}", self.grace)
            return True
        self.agent.note(f"rebalance recommendation {body}: syncing checkpoints now, training continues")
        # In its own thread: a spot notice two minutes later must still be seen within one poll.
        threading.Thread(target=self._sync, name="RebalanceSync", daemon=True).start()
        return False

    def _sync(self) -> None:
        try:
            synced = self.agent.checkpoints.sync()
        except Exception as error:  # noqa: BLE001 - said; the periodic and final syncs still come
            self.agent.log(f"WARNING: checkpoint sync after the rebalance recommendation failed: {error!r}")
            return
        if synced:
            self.agent.note("checkpoints synced after the rebalance recommendation")
        else:
            self.agent.log("WARNING: checkpoint sync after the rebalance recommendation failed")


def stop_tag_reason(value: str) -> tuple[Outcome, str]:
    """The supervisor's stop tag: `budget`, `stall`, else (`user`, anything) a user's stop."""
    outcome = {"budget": Outcome.BUDGET, "stall": Outcome.STALLED}.get(value, Outcome.STOPPED)
    return outcome, f"stop requested (tag {TAG}:stop={re.sub(r'[^A-Za-z0-9._-]', '?', value)})"


class StopTagWatcher(Watcher):
    """A stop request from the supervisor (the instance tag): the same graceful stop as a spot notice."""

    look_at_start = True

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.every = agent.config.spot_poll_seconds

    def tick(self) -> bool:
        try:
            value = self.agent.imds.get(f"meta-data/tags/instance/{TAG}:stop")
        except ImdsError:
            return False
        if value is None:
            return False
        outcome, message = stop_tag_reason(value)
        self.agent.request_stop(outcome, message, self.agent.config.stop_grace_seconds)
        return True


def deadline_stop_at(deadline: float, started: float, grace: int) -> float:
    """Stop early enough to save outputs before the OS deadline powers off (no margin for a short attempt)."""
    margin = grace + 60
    if deadline - started <= 2 * margin:
        margin = 0
    return deadline - margin


class DeadlineWatcher(Watcher):
    """Sleeps until the stop time (read again each look: a clock that jumps is looked at again)."""

    look_at_start = True

    def stop_at(self) -> float:
        agent = self.agent
        return deadline_stop_at(agent.deadline_epoch, agent.started_epoch, agent.config.stop_grace_seconds)

    def pause(self) -> float:
        return min(60.0, max(0.0, self.stop_at() - self.agent.clock()))

    def tick(self) -> bool:
        agent = self.agent
        if agent.clock() < self.stop_at():
            return False
        agent.request_stop(Outcome.DEADLINE, f"{agent.deadline_why} reached", agent.config.stop_grace_seconds)
        return True


def busiest_gpu(output: str) -> float | None:
    """The busiest GPU from nvidia-smi's csv, so one busy GPU of eight is not "idle"; None: no figure."""
    values = [float(line) for line in output.split() if re.fullmatch(r"[0-9]+(\.[0-9]+)?", line)]
    return max(values) if values else None


class IdleWatcher(Watcher):
    """Busiest GPU below the threshold for idle_seconds: stop as idle. GPUUtilization once a minute."""

    look_at_start = True

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.every = min(15, max(1, agent.config.idle_seconds // 4))
        self.idle_since: float | None = None
        self.last_metric = 0.0
        self.warned = False

    def utilisation(self) -> float | None:
        try:
            done = subprocess.run(  # noqa: S603
                [self.agent.knobs.nvidia_smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=20, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
        return busiest_gpu(done.stdout)

    def tick(self) -> bool:
        agent, config = self.agent, self.agent.config
        now = agent.clock()
        util = self.utilisation()
        agent.gpu_percent = util
        if util is None:
            if not self.warned:
                agent.log(f"WARNING: {agent.knobs.nvidia_smi} gave no utilisation: GPU idle detection is off")
            self.warned = True
        elif now - self.last_metric >= 60:
            self.last_metric = now
            metric = Metric("GPUUtilization", util, "Percent", (("InstanceId", agent.instance.instance_id),))
            agent.put_metrics([metric], "metric not sent")
        if util is not None and util < config.idle_gpu_percent:
            self.idle_since = self.idle_since if self.idle_since is not None else now
            if now - self.idle_since >= config.idle_seconds:
                agent.request_stop(
                    Outcome.IDLE,
                    f"GPU utilisation below {_number(config.idle_gpu_percent)}% for {config.idle_seconds}s",
                    config.stop_grace_seconds,
                )
                return True
        else:
            self.idle_since = None
        return False


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class ProgressWatcher(Watcher):
    """The trainer's beats: metrics and progress.json once a minute with progress; no progress for
    stall_seconds after the first beat, while the trainer lives: diagnostics, then stop as stalled."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        stall = agent.config.stall_seconds
        self.every = 1 if 0 < stall < 30 else 5
        self.sent_at = 0.0
        self.sent_change: float | None = None

    def tick(self) -> bool:
        agent = self.agent
        now = agent.clock()
        progress = agent.observe_progress(now)
        if progress.changed_epoch is None:
            return False
        if progress.changed_epoch != self.sent_change and now - self.sent_at >= agent.knobs.progress_metric_seconds:
            self.sent_at, self.sent_change = now, progress.changed_epoch
            dims = (("RunId", agent.run_id),)
            metrics = [Metric("Progress", 1, "Count", dims)]
            if progress.step is not None:
                metrics.append(Metric("TrainingStep", progress.step, "None", dims))
            if progress.steps_per_second is not None:
                metrics.append(Metric("StepsPerSecond", progress.steps_per_second, "Count/Second", dims))
            agent.put_metrics(metrics, "progress metrics not sent")
            agent.upload_progress()
        stall = agent.config.stall_seconds
        if stall > 0 and now - progress.changed_epoch >= stall and agent.trainer_alive():
            agent.collect_diagnostics()
            step = "-" if progress.step is None else _number(progress.step)
            agent.request_stop(
                Outcome.STALLED,
                f"no progress in {agent.trainer_heartbeat} for {int(now - progress.changed_epoch)}s (last step {step})",
                agent.config.stop_grace_seconds,
            )
            return True
        return False


class CheckpointWatcher(Watcher):
    """Only changed files travel; logs ride along so a hard kill loses little."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.every = agent.config.checkpoint_sync_seconds

    def tick(self) -> bool:
        agent = self.agent
        synced = agent.checkpoints.sync()
        if agent.halt.is_set():
            # Finalize ended this sync's upload to run its own: no failure, and no freshness to judge.
            return True
        if not synced:
            agent.log(f"WARNING: periodic checkpoint sync failed; next try in {self.every}s")
        agent.check_checkpoint_freshness()
        agent.upload_logs()
        return False


class LogWatcher(Watcher):
    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.every = agent.knobs.log_ship_seconds

    def tick(self) -> bool:
        if self.agent.shipper is None:
            return True
        try:
            self.agent.shipper.ship()
        except (AwsError, OSError) as error:
            self.agent.log(f"WARNING: CloudWatch Logs upload failed: {error}")
        return False


class CredentialWatcher(Watcher):
    """The trainer role's session at half-life; after a failed renewal, every minute until one succeeds."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.every = agent.knobs.credentials_refresh_seconds

    def run(self) -> None:
        if self.agent.config.trainer_role_arn:
            super().run()

    def tick(self) -> bool:
        agent = self.agent
        self.every = 60  # until this renewal succeeded: a raise here also retries in a minute
        if agent.retry("trainer role", agent.assume_trainer_role):
            self.every = agent.knobs.credentials_refresh_seconds
        else:
            agent.log("WARNING: trainer role session not renewed; trying again in 60 s")
        return False


WATCHERS = (
    SpotWatcher,
    StopTagWatcher,
    DeadlineWatcher,
    IdleWatcher,
    ProgressWatcher,
    CheckpointWatcher,
    LogWatcher,
    CredentialWatcher,
)
