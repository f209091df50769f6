"""`make demo`: a whole training run on the local AWS, told as the commands a user types.

A short script on top of `training-infra local up` (training_infra/local/sandbox.py), the one
code path: the sandbox deploys the stacks with the real CDK CLI, runs the supervisor and plays
every instance; the demo only runs `training-infra` verbs against it, as a user would by hand.
With a sandbox already in effect (`eval "$(training-infra local env)"`, same runtime) it uses that
one and leaves it running; else it starts its own and stops it at the end.
`--spot-interruption`: `local interrupt` at the first checkpoint; the supervisor relaunches.
`--runtime docker`: the production container path on podman (the example image built here).
`--multinode` (`make demo-multinode`): a 2-node gang of examples/trainer/train_torch.py (DDP over gloo),
node 1 reclaimed (one replacement joins the same attempt), then node 0 (the whole gang relaunches as
attempt 2); the real supervisor decides both, the timings of each path are printed (`GangStory`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from training_infra import naming
from training_infra.local.containers import unavailable_reason
from training_infra.local.instance import aws_client
from training_infra.local.sandbox import (
    DIR_VARIABLE,
    SandboxError,
    SandboxState,
    running_state,
    stop_running,
    wait_ready,
)

ROOT = Path(__file__).resolve().parents[2]
STEP_TIMEOUT_SECONDS = 300
DEFAULT_WORKDIR = ROOT / ".local" / "demo"
console = Console(highlight=False, soft_wrap=True)


class DemoFailed(RuntimeError):
    pass


class Demo:
    schedule_seconds: float | None = None  # the sandbox's reconcile schedule when the demo starts its own

    def __init__(
        self, *, workdir: Path, epochs: int, step_seconds: float, spot_interruption: bool, runtime: str = "process"
    ) -> None:
        self.workdir = workdir
        self.runtime = runtime
        self.epochs = epochs
        self.step_seconds = step_seconds
        self.spot_interruption = spot_interruption
        self.step_number = 0
        self.run_id = f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        self.sandbox_dir = workdir / "sandbox"
        self.sandbox: subprocess.Popen[bytes] | None = None  # ours to stop; None when we use the user's
        self.state: SandboxState | None = None

    # ------------------------------------------------------------------ plumbing
    @property
    def env(self) -> dict[str, str]:
        assert self.state is not None
        # COLUMNS: the CLI's tables and values print unwrapped into the narration.
        return {**os.environ, **self.state.env, DIR_VARIABLE: str(self.sandbox_dir), "COLUMNS": "160"}

    def step(self, text: str) -> None:
        self.step_number += 1
        console.print(f"\n[bold cyan]{self.step_number}.[/] [bold]{text}[/]")

    def cli(self, *args: str, show: bool = True) -> str:
        if show:  # a poll (show=False) is no step of the story
            console.print(f"   [dim]$ training-infra {' '.join(args).replace(str(ROOT) + '/', '')}[/]")
        result = subprocess.run(
            [sys.executable, "-m", "training_infra", *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=STEP_TIMEOUT_SECONDS,
        )  # fmt: skip
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise DemoFailed(f"`training-infra {' '.join(args)}` exited {result.returncode}:\n{tail}")
        if show and result.stdout.strip():
            console.print("   " + result.stdout.rstrip().replace("\n", "\n   "), markup=False, highlight=False)
        return result.stdout

    # ------------------------------------------------------------------ the story
    def main(self) -> Path:
        started = time.monotonic()
        self._sandbox_up()
        self.step("Upload the example dataset to the data bucket")
        self.cli("upload", str(ROOT / "examples" / "data"))

        self.step(f"Launch run {self.run_id}: a managed run; the sandbox plays the instance the supervisor starts")
        # The container runs its image's CMD; the process runtime runs the example trainer directly.
        trainer = ROOT / "examples" / "trainer" / "train.py"
        command = [] if self.runtime == "docker" else ["--command", f"python3 {trainer}"]
        self.cli(
            "launch", "--run-id", self.run_id, "--max-runtime-hours", "1", *command,
            "--env", f"EPOCHS={self.epochs}", "--env", f"STEP_SECONDS={self.step_seconds}",
        )  # fmt: skip

        self.step(
            "Follow the log until the run ends"
            + (": at the first checkpoint, AWS sends a spot interruption notice" if self.spot_interruption else "")
        )
        self._follow_logs()

        self.step("Its status (every attempt) and what it cost")
        self.cli("status", self.run_id)
        self.cli("cost")

        self.step("Fetch the outputs")
        destination = self.workdir / "outputs" / self.run_id
        self.cli("fetch", self.run_id, str(destination))
        for path in sorted(p for p in destination.rglob("*") if p.is_file()):
            console.print(f"   {path.relative_to(self.workdir)}  ({path.stat().st_size} bytes)")

        self._sandbox_down()
        console.print(f"\n[bold green]Demo finished in {time.monotonic() - started:.0f} s.[/]")
        console.print(f"   outputs fetched: {destination}")
        console.print(
            '   By hand: `make local`, then in another shell `eval "$(training-infra local env)"` and the same'
        )
        console.print("   verbs (README, 'Work locally'); on real AWS: make deploy, then the same verbs again.")
        return destination

    def _sandbox_up(self) -> None:
        given = os.environ.get(DIR_VARIABLE)
        if given:
            try:
                state = running_state(Path(given))
            except SandboxError:
                state = None
            if state is not None and state.runtime == self.runtime:
                self.sandbox_dir, self.state = Path(given), state
                self.step(f"Use the local AWS already running (pid {state.pid}, {state.endpoint}; left running)")
                console.print(f"   its supervisor runs every {state.schedule_seconds:g} s; it plays every instance")
                return
        self.step("Start the local AWS: `training-infra local up` (what `make local` runs), in the background")
        argv = [sys.executable, "-m", "training_infra", "local", "up", "--runtime", self.runtime]
        if self.schedule_seconds is not None:
            argv += ["--schedule", f"{self.schedule_seconds:g}"]
        console.print(f"   [dim]$ training-infra {' '.join(argv[3:])} --dir {self.sandbox_dir}[/]")
        log = self.workdir / "local-up.log"
        with open(log, "wb") as sink:
            self.sandbox = subprocess.Popen(
                [*argv, "--dir", str(self.sandbox_dir)], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, start_new_session=True,
            )  # fmt: skip
        try:
            self.state = wait_ready(self.sandbox_dir, self.sandbox, timeout=STEP_TIMEOUT_SECONDS + 600)
        except SandboxError as error:
            tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-10:])
            raise DemoFailed(f"{error}:\n{tail}") from None
        for line in log.read_text().splitlines():
            console.print(f"   {line}", markup=False)

    def _sandbox_down(self) -> None:
        if self.sandbox is None:
            return
        self.step("Stop the local AWS: no process, container or folder of it is left")
        self.cli("local", "down", "--dir", str(self.sandbox_dir))
        self.sandbox.wait(timeout=60)
        self.sandbox = None

    def _follow_logs(self) -> None:
        """`logs RUN -f` as a user runs it: it ends when the run ends (the sandbox's supervisor ends it)."""
        console.print(f"   [dim]$ training-infra logs {self.run_id} -f[/]")
        follower = subprocess.Popen(
            [sys.executable, "-m", "training_infra", "logs", self.run_id, "-f"],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert follower.stdout is not None
        interrupted, deadline = False, time.monotonic() + STEP_TIMEOUT_SECONDS
        for line in follower.stdout:
            console.print(f"   │ {line.rstrip()}", markup=False, highlight=False)
            if self.spot_interruption and not interrupted and re.search(r"\[trainer\] checkpoint ", line):
                interrupted = True
                self.cli("local", "interrupt", self.run_id)
            if time.monotonic() > deadline:
                follower.kill()
                raise DemoFailed(f"run {self.run_id} did not end within {STEP_TIMEOUT_SECONDS} s")
        if follower.wait() != 0:
            raise DemoFailed(f"`training-infra logs {self.run_id} -f` exited {follower.returncode}")
        if self.spot_interruption and not interrupted:
            raise DemoFailed("the trainer wrote no checkpoint before it ended: nothing to interrupt")


STEP_LINE = re.compile(r"\[trainer rank \d+\] step (\d+)/\d+ ")
RESUMED_LINE = re.compile(r"\[trainer rank \d+\] resumed from step-(\d+)")
CHECKPOINT_LINE = re.compile(r"\[trainer rank \d+\] checkpoint step-(\d+)")
FINISHED_LINE = re.compile(r"\[trainer rank \d+\] finished")


@dataclass
class NodeBox:
    """One played member of the gang: its node index and attempt (its tags), its trainer's log on its disk."""

    instance_id: str
    node: int
    attempt: int
    log: Path
    trained: list[int] = field(default_factory=list)  # the steps its log showed, kept before the sandbox goes

    def keep(self) -> None:
        self.trained = self.steps()

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def steps(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines() if (m := STEP_LINE.search(line))]

    def checkpoints(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines() if (m := CHECKPOINT_LINE.search(line))]


@dataclass
class NodeLoss:
    """One reclaimed node and what followed, as the demo measured it."""

    path: str  # replacement | whole gang
    node: int
    instance_id: str
    newest_complete_step: int  # complete on every node (each node's marker) when training started again
    resumed_from: int
    seconds_to_training: float  # from the notice to the first step after the resume
    resumed_on: list[NodeBox] = field(default_factory=list)


@dataclass
class GangStory:
    """What `make demo-multinode` saw: the tests assert on it."""

    run_id: str
    first: list[NodeBox] = field(default_factory=list)  # attempt 1's members as launched
    losses: list[NodeLoss] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # `status RUN --output json` at the end


class GangDemo(Demo):
    """`make demo-multinode`: a 2-node gang on the local AWS, the real supervisor and agents; a non-host lost,
    then the host. Training logs are read from the played instances' disks (the sandbox's folder)."""

    nodes = 2
    schedule_seconds = 5.0

    def __init__(self, *, workdir: Path, steps: int, step_seconds: float, checkpoint_every: int) -> None:
        super().__init__(workdir=workdir, epochs=steps, step_seconds=step_seconds, spot_interruption=True)
        self.checkpoint_every = checkpoint_every
        self.run_id = f"gang-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        self.story = GangStory(self.run_id)

    def main(self) -> GangStory:  # type: ignore[override]
        started = time.monotonic()
        self._sandbox_up()
        self.step("Upload the example dataset to the data bucket")
        self.cli("upload", str(ROOT / "examples" / "data"))
        self.step(f"Launch run {self.run_id} on {self.nodes} nodes: one fleet, node 0 hosts torchrun's rendezvous")
        trainer = ROOT / "examples" / "trainer" / "train_torch.py"
        self.cli(
            "launch", "--run-id", self.run_id, "--nodes", str(self.nodes), "--max-runtime-hours", "1",
            "--command", f"python3 {trainer}", "--env", f"STEPS={self.epochs}",
            "--env", f"STEP_SECONDS={self.step_seconds}", "--env", f"CHECKPOINT_EVERY={self.checkpoint_every}",
        )  # fmt: skip

        self.step("Both nodes train (DDP over gloo; each node's agent wrapped the command in torchrun)")
        self.story.first = self._wait(lambda boxes: self._training(boxes, attempt=1), "both nodes training")
        self._show_steps(self.story.first)
        self.cli("status", self.run_id)

        for node, path in ((1, "replacement"), (0, "whole gang")):
            what = "a non-host" if node else "the rendezvous host"
            self.step(f"AWS reclaims node {node} ({what}) after a checkpoint: `local interrupt --node {node}`")
            after = self.story.losses[-1].resumed_from if self.story.losses else 0
            self._wait(lambda boxes, after=after: self._checkpointed(boxes, after=after), "a new complete checkpoint")
            loss = self._lose(node, path)
            self.story.losses.append(loss)
            console.print(
                f"   [green]training again {loss.seconds_to_training:.1f} s after the notice[/] ({path} path): "
                f"resumed from step {loss.resumed_from} (newest complete step {loss.newest_complete_step}) on "
                + ", ".join(f"node {b.node} {b.instance_id} (attempt {b.attempt})" for b in loss.resumed_on)
            )
            self.cli("status", self.run_id)

        self.step("The run finishes (polled: `status RUN --output json`)")
        self.story.status = self._wait_outcome()
        self.cli("status", self.run_id)
        self.step("Node loss to training again (local AWS; on EC2 an instance's boot adds minutes to both)")
        for loss in self.story.losses:
            console.print(f"   {loss.path:<12} node {loss.node} lost: {loss.seconds_to_training:5.1f} s")
        for box in [*self.story.first, *(b for loss in self.story.losses for b in loss.resumed_on)]:
            box.keep()  # `local down` removes the instances' disks
        self._sandbox_down()
        console.print(f"\n[bold green]Demo finished in {time.monotonic() - started:.0f} s.[/]")
        return self.story

    # ------------------------------------------------------------------ what the played instances show
    def boxes(self) -> list[NodeBox]:
        """Every member the sandbox plays for this run (ended ones too), from its tags in the local AWS."""
        assert self.state is not None
        ec2 = aws_client("ec2", self.state.env)
        found = []
        pages = ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": f"tag:{naming.TAG_RUN_ID}", "Values": [self.run_id]}]
        )
        for page in pages:
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    if not tags.get(naming.TAG_NODE, "").isdigit():
                        continue  # tagged by the supervisor a moment after the fleet returned
                    disk = self.sandbox_dir / "instances" / instance["InstanceId"] / "fs"
                    log = disk / "var" / "log" / "training.log"
                    found.append(NodeBox(instance["InstanceId"], int(tags[naming.TAG_NODE]),
                                         int(tags.get(naming.TAG_ATTEMPT, "0")), log))  # fmt: skip
        return sorted(found, key=lambda b: (b.attempt, b.node, b.instance_id))

    def _wait(self, ready: Any, what: str, timeout: float = STEP_TIMEOUT_SECONDS) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            boxes = self.boxes()
            found = ready(boxes)
            if found:
                return found
            if any(FINISHED_LINE.search(line) for box in boxes for line in box.lines()):
                raise DemoFailed(
                    f"run {self.run_id}: the trainer finished before {what} (a busy machine?): give more --epochs"
                )
            time.sleep(0.2)
        raise DemoFailed(f"run {self.run_id}: no {what} within {timeout:.0f} s (logs in {self.sandbox_dir})")

    def _training(self, boxes: list[NodeBox], *, attempt: int) -> list[NodeBox] | None:
        mine = [b for b in boxes if b.attempt == attempt]
        return mine if len({b.node for b in mine if b.steps()}) == self.nodes else None

    def _checkpointed(self, boxes: list[NodeBox], *, after: int) -> int | None:
        """The newest step complete on every node, once it is past `after` (the last resume's)."""
        newest = _complete_step(boxes, self.nodes)
        return newest if newest and newest > after else None

    def _show_steps(self, boxes: list[NodeBox]) -> None:
        for box in boxes:
            last = next((line for line in reversed(box.lines()) if STEP_LINE.search(line)), "")
            console.print(f"   node {box.node} {box.instance_id}: {last.strip()}", markup=False)

    def _lose(self, node: int, path: str) -> NodeLoss:
        seen = {b.instance_id: len(b.lines()) for b in self.boxes()}
        (lost,) = [b for b in self.boxes() if b.node == node and b.attempt == max(x.attempt for x in self.boxes())][-1:]
        noticed = time.monotonic()
        self.cli("local", "interrupt", self.run_id, "--node", str(node))

        def resumed(boxes: list[NodeBox]) -> list[NodeBox] | None:
            again = []
            for box in boxes:
                fresh = box.lines()[seen.get(box.instance_id, 0) :]
                at = next((i for i, line in enumerate(fresh) if RESUMED_LINE.search(line)), None)
                if at is not None and any(STEP_LINE.search(line) for line in fresh[at:]):
                    again.append(box)
            return again if len({b.node for b in again}) == self.nodes else None

        again = self._wait(resumed, f"training again after node {node} was lost")
        seconds = time.monotonic() - noticed
        step = next(
            int(m.group(1))
            for box in again
            for line in box.lines()[seen.get(box.instance_id, 0) :]
            if (m := RESUMED_LINE.search(line))
        )
        return NodeLoss(
            path=path, node=node, instance_id=lost.instance_id, newest_complete_step=_complete_step(self.boxes(),
            self.nodes, before_resume=seen) or 0, resumed_from=step, seconds_to_training=seconds, resumed_on=again,
        )  # fmt: skip

    def _wait_outcome(self) -> dict[str, Any]:
        deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            (row,) = json.loads(self.cli("status", self.run_id, "--output", "json", show=False))
            if row.get("outcome"):
                return row
            time.sleep(1)
        raise DemoFailed(f"run {self.run_id} did not end within {STEP_TIMEOUT_SECONDS} s")


def _complete_step(boxes: list[NodeBox], nodes: int, before_resume: dict[str, int] | None = None) -> int | None:
    """The newest step every node index logged its checkpoint of (before each log's first resume after
    `before_resume`'s line counts, when given): complete on every node, the one a resume must start from."""
    saved: dict[int, set[int]] = {}
    for box in boxes:
        lines = box.lines()
        if before_resume is not None:
            start = before_resume.get(box.instance_id, 0)
            cut = next((start + i for i, line in enumerate(lines[start:]) if RESUMED_LINE.search(line)), len(lines))
            lines = lines[:cut]
        for line in lines:
            if m := CHECKPOINT_LINE.search(line):
                saved.setdefault(int(m.group(1)), set()).add(box.node)
    complete = [step for step, who in saved.items() if len(who) == nodes]
    return max(complete) if complete else None


OWNER_MARK = ".training-infra-demo"  # in a --workdir this tool made: only such a folder is emptied


def _claim_workdir(workdir: Path, *, default: bool = False) -> str | None:
    """The demo's folder, emptied if an earlier demo made it (or it is the default under .local/, the tool's own);
    never one it did not make (one line why not)."""
    if workdir.exists() and not workdir.is_dir():
        return f"--workdir {workdir}: exists and is not a folder; give a new or empty folder"
    if workdir.exists() and any(workdir.iterdir()):
        if not default and not (workdir / OWNER_MARK).is_file():
            return (
                f"--workdir {workdir}: not empty and not made by `make demo` (no {OWNER_MARK}); "
                "give a new or empty folder"
            )
        # An earlier demo killed before its clean-up may have left its local AWS running on this folder:
        # stop it (and end what it started) first, or its later shut-down would delete the new demo's sandbox.
        try:
            stop_running(workdir / "sandbox")
        except SandboxError as error:
            return f"--workdir {workdir}: an earlier demo's local AWS still uses it and did not stop: {error}"
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / OWNER_MARK).write_text("made by `make demo`: the next demo empties this folder\n")
    return None


def gang_story(workdir: Path, *, steps: int = 60, step_seconds: float = 0.4, checkpoint_every: int = 3) -> GangStory:
    """`make demo-multinode` in `workdir` (a new or empty folder), its sandbox stopped however it ends: for the
    test that asserts on the story and the bench that prints its timings. 60 steps of 0.4 s: a busy machine's
    demo still reclaims both nodes before the trainer ends."""
    refusal = _claim_workdir(workdir)
    if refusal:
        raise DemoFailed(refusal)
    demo = GangDemo(workdir=workdir, steps=steps, step_seconds=step_seconds, checkpoint_every=checkpoint_every)
    try:
        return demo.main()
    finally:
        if demo.sandbox is not None:
            stop_running(demo.sandbox_dir)
            demo.sandbox.wait(timeout=60)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--spot-interruption", action="store_true", help="interrupt the run at its first checkpoint; it resumes"
    )
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR,
        help="where fetched outputs (and its sandbox) go: a new or empty folder, or one an earlier demo made",
    )  # fmt: skip
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of the example trainer (default 12; 60 with a spot notice); --multinode: its steps (60)",
    )
    parser.add_argument("--step-seconds", type=float, default=0.5, help="seconds per epoch of the example trainer")
    parser.add_argument(
        "--multinode", action="store_true",
        help="a 2-node gang (train_torch.py, DDP): node 1 reclaimed and replaced, then node 0 and the gang relaunched",
    )  # fmt: skip
    parser.add_argument(
        "--runtime", choices=("process", "docker"), default="process",
        help="process: the trainer runs directly; docker: the production container path on podman (needs root)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.runtime == "docker" and (reason := unavailable_reason()):
        console.print(f"make demo: --runtime docker is not available here: {reason}")
        return 2
    refusal = _claim_workdir(args.workdir, default=args.workdir == DEFAULT_WORKDIR)
    if refusal:
        console.print(f"make demo: {refusal}", markup=False)
        return 2
    demo: Demo
    if args.multinode:
        demo = GangDemo(workdir=args.workdir, steps=args.epochs or 60, step_seconds=args.step_seconds,
                        checkpoint_every=5)  # fmt: skip
    else:
        demo = Demo(
            workdir=args.workdir,
            epochs=args.epochs or (60 if args.spot_interruption else 12),
            step_seconds=args.step_seconds,
            spot_interruption=args.spot_interruption,
            runtime=args.runtime,
        )
    try:
        demo.main()
        return 0
    except (DemoFailed, SandboxError, subprocess.TimeoutExpired) as error:
        console.print(f"\n[bold red]demo failed at step {demo.step_number}:[/] {error}")
        return 1
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: stopping the local AWS[/]")
        return 130
    finally:
        if demo.sandbox is not None:
            stop_running(demo.sandbox_dir)
            demo.sandbox.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
