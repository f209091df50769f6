"""`make demo`: a whole training run on the local AWS, with the real CDK CLI, CLI and agent.

Each step is what a user does on real AWS, against a moto server instead of an account:
deploy the stacks, upload data, launch a run, (the instance runs here), watch, fetch, destroy
compute. `--spot-interruption` also sends a spot notice mid-run and resumes on a second launch.
`--runtime docker` runs the production container path on podman (training_infra/local/containers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from training_infra import naming
from training_infra.local.containers import ContainerEngine, unavailable_reason
from training_infra.local.emulator import Emulator, EmulatorError
from training_infra.local.events import SPOT_WARNING, STATE_CHANGE, ec2_event
from training_infra.local.instance import LocalInstance, aws_client

ROOT = Path(__file__).resolve().parents[2]
CDK = ROOT / "node_modules" / ".bin" / "cdk"
# moto ships this image id; the emulator cannot resolve the Deep Learning AMI's public SSM parameter.
LOCAL_AMI = "ami-12c6146b"
STEP_TIMEOUT_SECONDS = 300
# What the process runtime's launch needs in ECR: a tag to find (it runs --command, no image).
STAND_IN_MANIFEST = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {},
    "layers": [],
}
console = Console(highlight=False, soft_wrap=True)


class DemoFailed(RuntimeError):
    pass


class _TrainingLog:
    """The instance's /var/log/training.log (trainer output and the agent's milestones), shown as it grows."""

    def __init__(self, box: LocalInstance) -> None:
        self.path = box.root / "fs" / "var" / "log" / "training.log"
        self.offset = 0

    def show_new_lines(self) -> None:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            console.print(f"   │ {line}", markup=False, highlight=False)


class Demo:
    def __init__(
        self, *, workdir: Path, epochs: int, step_seconds: float, spot_interruption: bool, runtime: str = "process"
    ) -> None:
        self.workdir = workdir
        self.runtime = runtime
        self.engine: ContainerEngine | None = None
        self.epochs = epochs
        self.step_seconds = step_seconds
        self.spot_interruption = spot_interruption
        self.emulator = Emulator(workdir / "emulator")
        self.step_number = 0
        self.run_id = f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        self.cli_outputs: dict[str, str] = {}
        self._training_logs: dict[str, _TrainingLog] = {}

    # ------------------------------------------------------------------ plumbing
    @property
    def env(self) -> dict[str, str]:
        # COLUMNS: the CLI's tables and values print unwrapped into the narration.
        return {
            **os.environ,
            **self.emulator.env,
            "CDK_DISABLE_VERSION_CHECK": "true",
            "CDK_DISABLE_CLI_TELEMETRY": "true",
            "COLUMNS": "160",
        }

    def step(self, text: str) -> None:
        self.step_number += 1
        console.print(f"\n[bold cyan]{self.step_number}.[/] [bold]{text}[/]")

    def run(self, argv: Sequence[str], *, show: bool = True, ok_codes: tuple[int, ...] = (0,)) -> str:
        printable = " ".join(str(a) for a in argv).replace(str(ROOT) + "/", "")
        console.print(f"   [dim]$ {printable}[/]")
        result = subprocess.run(
            [str(a) for a in argv], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=STEP_TIMEOUT_SECONDS
        )
        if result.returncode not in ok_codes:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise DemoFailed(f"`{printable}` exited with {result.returncode}:\n{tail}")
        if show and result.stdout.strip():
            console.print("   " + result.stdout.rstrip().replace("\n", "\n   "), markup=False, highlight=False)
        return result.stdout

    def cli(self, *args: str, show: bool = True) -> str:
        return self.run([sys.executable, "-m", "training_infra", *args], show=show)

    def client(self, service: str):
        return aws_client(service, self.emulator.env)

    # ------------------------------------------------------------------ the story
    def main(self) -> Path:
        started = time.monotonic()
        self.step("Start the local AWS (a moto server on loopback; no account, no network)")
        self.emulator.start()
        console.print(f"   emulator at {self.emulator.endpoint} (pid file and log in {self.emulator.log_dir})")

        self.step("cdk bootstrap and cdk deploy of all four stacks, with the real CDK CLI")
        self.run(
            [
                CDK,
                "bootstrap",
                f"aws://123456789012/{self.emulator.region}",
                "--no-notices",
                "--output",
                self.workdir / "cdk.out",
            ],
            show=False,
        )
        self.run(
            [CDK, "deploy", "--all", "--method=direct", "--no-previous-parameters", "--require-approval", "never",
             "--no-notices", "--output", self.workdir / "cdk.out", "-c", f"image_id={LOCAL_AMI}"],
            show=False,
        )  # fmt: skip
        self.cli("outputs")

        self.step(
            "Push a training image (stands in for the GitHub image workflow; "
            + ("podman runs it)" if self.runtime == "docker" else "the local runtime runs the trainer directly)")
        )
        self._push_stand_in_image()

        self.step("Upload the example dataset to the data bucket")
        self.cli("upload", str(ROOT / "examples" / "data"))

        if self.spot_interruption:
            self._spot_story()
        else:
            self._launch_and_play(expect="succeeded")

        self.step("Watch: the run's log stream, its status and what it cost")
        self.cli("logs", self.run_id)
        self.cli("status", self.run_id)
        self.cli("cost")

        self.step("Fetch the outputs")
        destination = self.workdir / "outputs" / self.run_id
        self.cli("fetch", self.run_id, str(destination))
        for path in sorted(p for p in destination.rglob("*") if p.is_file()):
            console.print(f"   {path.relative_to(self.workdir)}  ({path.stat().st_size} bytes)")

        self.step("Destroy the compute stack; data and outputs stay")
        self.run([CDK, "destroy", naming.COMPUTE_STACK, "--force", "--no-notices", "--output", self.workdir / "cdk.out",
                  "-c", f"image_id={LOCAL_AMI}"],
                 show=False, ok_codes=(0, 1))  # fmt: skip
        self._check_compute_gone_and_data_kept()

        console.print(
            f"\n[bold green]Demo finished in {time.monotonic() - started:.0f} s.[/] Everything is under {self.workdir}:"
        )
        console.print(f"   outputs fetched:   {destination}")
        console.print(f"   the instance:      {self.workdir / 'instances'} (user data, console log, its disk)")
        console.print(f"   emulator log:      {self.emulator.log_dir / 'moto.log'}")
        console.print(
            "   On real AWS the same steps are: make deploy, then training-infra upload / launch / logs / fetch."
        )
        return destination

    def _push_stand_in_image(self) -> None:
        """ECR is two services: its API (the emulator's, which `launch` asks whether the tag exists) and its
        registry (the local one podman pushes to). A push on AWS updates both; here the demo puts the
        manifest the registry holds into the emulator's ECR, or a stand-in one for the process runtime."""
        repository = self.cli("outputs", "ecr_repository_uri", show=False).strip().rsplit("/", 1)[-1]
        if self.runtime == "docker":
            manifest = self._push_container_image(repository)
            what = "the manifest the local registry holds"
        else:
            manifest = json.dumps(STAND_IN_MANIFEST)
            what = "a stand-in manifest"
        self.client("ecr").put_image(repositoryName=repository, imageManifest=manifest, imageTag="latest")
        console.print(
            f"   [dim]ECR PutImage:[/] {what} tagged {repository}:latest "
            "(on AWS, the image workflow pushes the real one)"
        )

    def _push_container_image(self, repository: str) -> str:
        """examples/trainer/Dockerfile built here (its Docker Hub base swapped for a local Debian one) and
        pushed to a local registry that answers as the stack's ECR repository; returns its manifest."""
        uri = self.cli("outputs", "ecr_repository_uri", show=False).strip()
        host = uri.split("/", 1)[0]
        account, _, _, region = host.split(".")[:4]
        self.engine = ContainerEngine(self.workdir / "container-engine", account=account, region=region)
        try:
            self.engine.start()
            console.print(f"   podman + docker-registry at {self.engine.registry_address}:80 as {host}")
            console.print("   podman build examples/trainer (about a minute: numpy from PyPI)")
            image = self.engine.build_example_trainer()
        except subprocess.CalledProcessError as error:
            raise DemoFailed(
                f"`{' '.join(error.cmd[-6:])}` exited {error.returncode}: {error.stderr.strip()}"
            ) from None
        except RuntimeError as error:
            raise DemoFailed(str(error)) from None
        console.print(f"   pushed {self.engine.push_trainer(repository, 'latest', image=image)}")
        return self.engine.manifest(repository, "latest")

    def _launch(self) -> None:
        self.step(f"Launch run {self.run_id} with the CLI: a managed run, attempt 1 starts in seconds")
        # The container runs its image's CMD; the process runtime runs the example trainer directly.
        command = [] if self.engine else ["--command", f"python3 {ROOT / 'examples' / 'trainer' / 'train.py'}"]
        self.cli(
            "launch", "--run-id", self.run_id, "--max-runtime-hours", "1", *command,
            "--env", f"EPOCHS={self.epochs}", "--env", f"STEP_SECONDS={self.step_seconds}",
        )  # fmt: skip

    def _play(self, *, expect: str, interrupt_after_checkpoint: bool = False) -> str:
        """Run the newest attempt's instance here until its agent ends; returns the instance id."""
        instance_id = self._instance_of(self.run_id)
        self.step(
            f"Play the instance {instance_id}: its real user data runs here under bash "
            f"({self.runtime} runtime, fake IMDS)"
        )
        box = LocalInstance(
            instance_id,
            root=self.workdir / "instances" / f"{instance_id}",
            aws_env=self.emulator.env,
            engine=self.engine,
        )
        with box:
            if interrupt_after_checkpoint:
                self._wait_for_local_checkpoint(box.root / "fs" / "checkpoints", log=self._training_log(box))
                console.print("   [yellow]AWS sends the 2-minute spot interruption notice[/]")
                box.interrupt_spot()
            code = self._wait_for_agent(box)
        status = self._status_json(self.run_id)
        console.print(
            f"   agent exited {code}; status.json: outcome={status.get('outcome')} exit_code={status.get('exit_code')}"
        )
        if status.get("outcome") != expect:
            raise DemoFailed(
                f"run {self.run_id} ended '{status.get('outcome')}', expected '{expect}'; see {box.log_path}"
            )
        return instance_id

    def _tell_supervisor(self, instance_id: str, *, spot_warning: bool = False) -> dict:
        """What EventBridge does on AWS: the instance's events go to the supervisor (its real code, here)."""
        supervisor = self._supervisor()
        region = self.emulator.region
        if spot_warning:
            supervisor.handle(ec2_event(SPOT_WARNING, instance_id, region=region, **{"instance-action": "terminate"}))
        console.print(
            f"   [dim]EventBridge -> supervisor: {STATE_CHANGE} {{instance-id: {instance_id}, state: terminated}}[/]"
        )
        result = supervisor.handle(ec2_event(STATE_CHANGE, instance_id, region=region, state="terminated"))
        console.print(f"   supervisor: {json.dumps(result, default=str)}", markup=False, highlight=False)
        return result

    def _supervisor(self):
        """The supervisor as the CLI plays its Lambda here: its real code, with the deployed stack's limits."""
        from unittest import mock

        from training_infra.cli.aws import Aws, NotDeployedError
        from training_infra.cli.launching import supervisor_for, supervisor_with

        with mock.patch.dict(os.environ, self.emulator.env):  # clients are made now, against the emulator
            try:
                return supervisor_for(Aws(self.emulator.region))
            except NotDeployedError:  # compute destroyed: its records can still be read
                return supervisor_with(
                    self.client, table=self._output("run_table_name"), outputs_bucket=self._output("outputs_bucket")
                )

    def _launch_and_play(self, *, expect: str) -> None:
        self._launch()
        instance_id = self._play(expect=expect)
        self.step("The instance powered off: EC2's state-change event reaches the supervisor, which ends the run")
        console.print(
            "   (the local AWS delivers no events and runs no Lambda: "
            "the demo hands the exact event AWS sends to the supervisor's real handler)"
        )
        self._tell_supervisor(instance_id)

    def _spot_story(self) -> None:
        self._launch()
        first = self._play(expect="interrupted", interrupt_after_checkpoint=True)
        checkpoints = self._keys(self._output("outputs_bucket"), f"{naming.CHECKPOINTS_PREFIX}{self.run_id}/")
        if not checkpoints:
            raise DemoFailed(f"the interrupted run left no checkpoint under {naming.CHECKPOINTS_PREFIX}{self.run_id}/")
        console.print(
            "   checkpoints flushed to S3 inside the notice: "
            f"{', '.join(key.rsplit('/', 1)[-1] for key in checkpoints)}"
        )
        self.step("AWS reclaimed attempt 1: the supervisor (not you) relaunches the run on other capacity")
        console.print(
            "   (the local AWS delivers no events and runs no Lambda: "
            "the demo hands the exact events AWS sends to the supervisor's real handler)"
        )
        result = self._tell_supervisor(first, spot_warning=True)
        if "launched" not in result:
            raise DemoFailed(f"the supervisor did not relaunch run {self.run_id}: {result}")
        second = self._play(expect="succeeded")
        self.step("Attempt 2 finished: its state-change event tells the supervisor, which ends the run")
        self._tell_supervisor(second)

    # ------------------------------------------------------------------ helpers
    def _output(self, name: str) -> str:
        if name not in self.cli_outputs:
            self.cli_outputs[name] = self.cli("outputs", name, show=False).strip()
        return self.cli_outputs[name]

    def _instance_of(self, run_id: str) -> str:
        reservations = self.client("ec2").describe_instances(
            Filters=[
                {"Name": f"tag:{naming.TAG_RUN_ID}", "Values": [run_id]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]
        )["Reservations"]
        instances = [i for r in reservations for i in r["Instances"]]
        if not instances:
            raise DemoFailed(f"no running instance is tagged {naming.TAG_RUN_ID}={run_id}")
        return instances[-1]["InstanceId"]

    def _keys(self, bucket: str, prefix: str) -> list[str]:
        pages = self.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def _wait_for_local_checkpoint(self, directory: Path, *, log: _TrainingLog, timeout: float = 120) -> None:
        """Interrupt only once the trainer has something to lose: its first checkpoint on the instance's disk."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log.show_new_lines()
            if directory.is_dir() and any(path.is_file() for path in directory.rglob("*")):
                return
            time.sleep(0.5)
        raise DemoFailed(f"the trainer wrote no checkpoint to {directory} within {timeout:.0f} s")

    def _training_log(self, box: LocalInstance) -> _TrainingLog:
        """One reader per instance, so a line shown while waiting for the checkpoint is not shown again."""
        if box.instance_id not in self._training_logs:
            self._training_logs[box.instance_id] = _TrainingLog(box)
        return self._training_logs[box.instance_id]

    def _wait_for_agent(self, box: LocalInstance) -> int:
        """Wait for the agent to end, showing the training log as it grows (no silent minute)."""
        log, started = self._training_log(box), time.monotonic()
        assert box.process is not None
        while box.process.poll() is None and time.monotonic() - started < STEP_TIMEOUT_SECONDS:
            log.show_new_lines()
            time.sleep(0.5)
        code = box.wait(timeout=max(1.0, STEP_TIMEOUT_SECONDS - (time.monotonic() - started)))
        log.show_new_lines()
        powered_off = " and powered the instance off" if box.powered_off_marker.exists() else ""
        console.print(f"   [dim]the agent ended {time.monotonic() - started:.0f} s later{powered_off}[/]")
        return code

    def _status_json(self, run_id: str) -> dict:
        body = self.client("s3").get_object(
            Bucket=self._output("outputs_bucket"), Key=f"{naming.RUNS_PREFIX}{run_id}/status.json"
        )["Body"]
        return json.loads(body.read())

    def _check_compute_gone_and_data_kept(self) -> None:
        stacks = {s["StackName"]: s["StackStatus"] for s in self.client("cloudformation").describe_stacks()["Stacks"]}
        if stacks.get(naming.COMPUTE_STACK, "DELETE_COMPLETE") != "DELETE_COMPLETE":
            raise DemoFailed(f"{naming.COMPUTE_STACK} is {stacks[naming.COMPUTE_STACK]} after cdk destroy")
        kept = len(self._keys(self._output("training_bucket"), naming.DATA_PREFIX)) + len(
            self._keys(self._output("outputs_bucket"), naming.RUNS_PREFIX)
        )
        console.print(f"   {naming.COMPUTE_STACK} is gone; {kept} data and output objects are still in S3")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--spot-interruption",
        action="store_true",
        help="interrupt the first run mid-way and resume it on a second launch",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / ".local" / "demo",
        help="where the emulator log, the instance and fetched outputs go",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of the example trainer (default 12; 30 with --spot-interruption)",
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
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    epochs = args.epochs or (30 if args.spot_interruption else 12)
    demo = Demo(
        workdir=args.workdir,
        epochs=epochs,
        step_seconds=args.step_seconds,
        spot_interruption=args.spot_interruption,
        runtime=args.runtime,
    )
    try:
        demo.main()
        return 0
    except (DemoFailed, EmulatorError, TimeoutError) as error:
        console.print(f"\n[bold red]demo failed at step {demo.step_number}:[/] {error}")
        return 1
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: stopping the emulator and the instance[/]")
        return 130
    finally:
        demo.emulator.stop()
        if demo.engine is not None:
            demo.engine.stop()


if __name__ == "__main__":
    sys.exit(main())
