"""The local AWS: a moto server on a free loopback port, owned by one process.

Tests, benchmarks and `make demo` all start it through this class, so the port choice, the
readiness wait, the log file and the clean stop live in one place.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# moto accepts any credentials; fixed fake ones keep real credentials out of the emulator.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",  # noqa: S105 - moto's documented dummy value
    "AWS_SESSION_TOKEN": "testing",  # noqa: S105
}
DEFAULT_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen, *, grace_seconds: float) -> None:
    """SIGTERM a process started with start_new_session and its children; SIGKILL after the grace."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class EmulatorError(RuntimeError):
    pass


class Emulator:
    """Start with `with Emulator(log_dir) as aws:`; `aws.env` points boto3, the AWS CLI and the CDK at it."""

    def __init__(
        self, log_dir: Path, *, region: str = DEFAULT_REGION, port: int | None = None, address_block: str = ""
    ) -> None:
        self.log_dir = Path(log_dir)
        # `127.N`: each instance gets a loopback address of its own in it (moto_server.teach_loopback_addresses).
        self.address_block = address_block
        self.region = region
        self.port = port or free_port()
        # localhost, not 127.0.0.1: moto misreads CloudFormation template URLs with the IP form.
        self.endpoint = f"http://localhost:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **FAKE_CREDENTIALS,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "CDK_DEFAULT_ACCOUNT": "123456789012",
            "CDK_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 30.0) -> Emulator:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if importlib.util.find_spec("moto") is None:
            raise EmulatorError("moto is not installed; run `make setup`")
        log = open(self.log_dir / "moto.log", "ab")  # noqa: SIM115 - lives as long as the server
        self._process = subprocess.Popen(
            # moto's server plus the launch-template instance it lacks (training_infra/local/moto_server.py).
            [sys.executable, "-m", "training_infra.local.moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "TI_LOCAL_ADDRESS_BLOCK": self.address_block},
        )
        (self.log_dir / "moto.pid").write_text(str(self._process.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmulatorError(
                    f"moto_server exited with {self._process.returncode}; see {self.log_dir / 'moto.log'}"
                )
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2):  # noqa: S310 - loopback
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise EmulatorError(f"moto_server did not answer on {self.endpoint} within {timeout:.0f} s")

    @property
    def pid(self) -> int | None:
        """The server's process id, also its process group's (start_new_session)."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        if self._process is None:
            return
        stop_process_group(self._process, grace_seconds=10)
        self._process = None
        (self.log_dir / "moto.pid").unlink(missing_ok=True)

    def reset(self) -> None:
        """Forget every resource (moto's reset API), keeping the server up."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")  # noqa: S310 - loopback
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - loopback
            pass

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
