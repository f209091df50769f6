"""Plays an EC2 instance launched into the local AWS: the real user data runs here under bash.

The emulator records the instance (type, tags, user data) but runs nothing. This takes that
record, serves a fake IMDS on the instance's own loopback address (its private address)
with the instance's identity and its tags (read from the emulator at
every request, as EC2's IMDS serves them: the agent learns its attempt and the run's deadline, and
sees a stop request at its next poll once `training-infra stop` tags the instance), and runs the
rendered agent with its root paths under a local folder and power-off wired back to the emulator
(InstanceInitiatedShutdownBehavior=terminate: powering off terminates the instance). The runtime
is `process` (the trainer command runs directly), or, given a `ContainerEngine`, the production
`docker` runtime on podman with the engine's registry answering as the account's ECR.
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import sys
from pathlib import Path

import boto3

from training_infra.local.containers import ContainerEngine, free_loopback_address
from training_infra.local.emulator import stop_process_group
from training_infra.local.imds import FakeImds
from training_infra.local.processes import end_processes_with

GPU_UTILISATION_PERCENT = "87"  # what the fake nvidia-smi reports: a busy GPU


def aws_client(service: str, aws_env: dict[str, str]):
    """A boto3 client for the emulator described by `Emulator.env`, whatever the caller's environment holds."""
    return boto3.client(
        service,
        endpoint_url=aws_env["AWS_ENDPOINT_URL"],
        region_name=aws_env["AWS_REGION"],
        aws_access_key_id=aws_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=aws_env["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=aws_env["AWS_SESSION_TOKEN"],
    )


class LocalInstance:
    """`with LocalInstance(instance_id, root=..., aws_env=...) as box: box.wait()`."""

    def __init__(
        self,
        instance_id: str,
        *,
        root: Path,
        aws_env: dict[str, str],
        extra_env: dict[str, str] | None = None,
        engine: ContainerEngine | None = None,
        address: str | None = None,
    ) -> None:
        self.instance_id = instance_id
        # The instance's private address, where its IMDS listens: given, else the emulator's when it is a
        # loopback one (the sandbox's emulator gives each instance its own), else a free loopback address.
        self.address = address
        self.market = ""
        self.root = Path(root)
        self.aws_env = aws_env
        self.extra_env = extra_env or {}
        self.engine = engine
        self.ec2 = aws_client("ec2", aws_env)
        self.imds: FakeImds | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.powered_off_marker = self.root / "powered-off"
        self.log_path = self.root / "console.log"

    def start(self) -> LocalInstance:
        (instance,) = self.ec2.describe_instances(InstanceIds=[self.instance_id])["Reservations"][0]["Instances"]
        attribute = self.ec2.describe_instance_attribute(InstanceId=self.instance_id, Attribute="userData")
        user_data = base64.b64decode(attribute["UserData"]["Value"]).decode()
        self.root.mkdir(parents=True, exist_ok=True)
        script = self.root / "user-data.sh"
        script.write_text(user_data)
        bin_dir = self._fake_binaries()
        private = instance.get("PrivateIpAddress") or ""
        self.address = self.address or (private if private.startswith("127.") else free_loopback_address(port=0))
        self.market = "spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand"
        self.imds = FakeImds(
            instance_id=self.instance_id,
            instance_type=instance["InstanceType"],
            region=self.aws_env["AWS_REGION"],
            availability_zone=instance["Placement"]["AvailabilityZone"],
            market=self.market,
            tags=self.tags,
            image_id=instance["ImageId"],
            private_ip=self.address,
            host=self.address,
        ).start()
        env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "HOME": str(self.root),
            **self.aws_env,
            "TI_ROOT": str(self.root / "fs"),
            "TI_RUNTIME": "docker" if self.engine else "process",
            **({"TI_DOCKER": str(self.engine.docker)} if self.engine else {}),
            "TI_POWEROFF_CMD": f"touch {shlex.quote(str(self.powered_off_marker))}",
            "TI_SHUTDOWN_BIN": str(bin_dir / "shutdown"),
            "TI_NVIDIA_SMI": str(bin_dir / "nvidia-smi"),
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds.url,
            "AWS_EC2_METADATA_DISABLED": "false",
            **self.extra_env,
        }
        argv = ["bash", str(script)]
        if self.engine is not None:  # where the engine's registry answers as ECR
            argv = self.engine.in_namespace(argv)
        with open(self.log_path, "ab") as console:
            self.process = subprocess.Popen(
                argv, env=env, stdout=console, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def tags(self) -> dict[str, str]:
        """The instance's tags as the local AWS holds them now."""
        reservations = self.ec2.describe_instances(InstanceIds=[self.instance_id])["Reservations"]
        return {tag["Key"]: tag["Value"] for r in reservations for i in r["Instances"] for tag in i.get("Tags", [])}

    def _fake_binaries(self) -> Path:
        bin_dir = self.root / "bin"
        bin_dir.mkdir(exist_ok=True)
        fakes = {
            # The OS deadline is real on EC2; here it is recorded so the demo can show it was armed.
            "shutdown": f'echo "shutdown $*" >> {shlex.quote(str(self.root / "shutdown.log"))}\n',
            "nvidia-smi": f"echo {GPU_UTILISATION_PERCENT}\n",
        }
        for name, body in fakes.items():
            path = bin_dir / name
            path.write_text(f"#!/bin/bash\n{body}")
            path.chmod(0o755)
        return bin_dir

    def interrupt_spot(self) -> None:
        """What AWS does two minutes before it reclaims a spot instance."""
        assert self.imds is not None
        self.imds.inject_spot_interruption()

    def wait(self, timeout: float) -> int:
        """Wait for the agent to end; a power-off terminates the emulated instance, as on EC2."""
        assert self.process is not None
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(
                f"the agent on {self.instance_id} did not finish within {timeout:.0f} s; see {self.log_path}"
            ) from None
        if self.powered_off_marker.exists():
            self.ec2.terminate_instances(InstanceIds=[self.instance_id])
        return code

    def stop(self) -> None:
        if self.process is not None:
            # The agent's SIGTERM handler (finalize) uploads logs and status on the way down, as at an OS shutdown.
            stop_process_group(self.process, grace_seconds=30)
            # EC2's power-off ends every process of the box: here also those outside the agent's group (a
            # torchrun left by a killed agent would keep port 29400 for the next gang's host).
            end_processes_with("TI_ROOT", str(self.root / "fs"))
        if self.imds is not None:
            self.imds.stop()
            self.imds = None

    def __enter__(self) -> LocalInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
