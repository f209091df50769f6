"""`make demo`: a whole training run on the local AWS, told as the commands a user types.

A short script on top of `training-infra local up` (training_infra/local/sandbox.py), the one
code path: the sandbox deploys the stacks with the real CDK CLI, runs the supervisor and plays
every instance; the demo only runs `training-infra` verbs against it, as a user would by hand.
With a sandbox already in effect (`eval "$(training-infra local env)"`, same runtime) it uses that
one and leaves it running; else it starts its own and stops it at the end.
`--spot-interruption`: `local interrupt` at the first checkpoint; the supervisor relaunches.
`--runtime docker`: the production container path on podman (the example image built here).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from training_infra.local.containers import unavailable_reason
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
        "--epochs", type=int, default=None, help="epochs of the example trainer (default 12; 60 with a spot notice)"
    )
    parser.add_argument("--step-seconds", type=float, default=0.5, help="seconds per epoch of the example trainer")
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
