"""Gangs of real agents on one machine, for tests/agent/test_agent_gang.py and scripts/bench_gang_agent.py.

Each node is a whole agent run (`agent_harness.AgentRun`: the rendered user data under bash, the
process runtime) with its own root folder and its own fake IMDS (its own instance id and tags); all
nodes share one run's buckets, log group and alert topic on the moto server, as the members of one
EC2 Fleet share the stack's. The trainer is examples/trainer/train_torch.py, which the agent wraps in
torchrun (c10d rendezvous on node 0's endpoint, gloo between the nodes).

The SUPERVISOR IS PLAYED here: `Gang.place` sets the tags the supervisor sets with CreateTags once the
fleet returned (`training-infra:node`, `training-infra:rendezvous`), a replacement is started with them
already in its launch tags, and `stop_others` sets `training-infra:stop` on the survivors of a lost host.
Rendezvous endpoints are 127.0.0.1 with a free port (each play-instance has no address of its own yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent_harness import REPO, AgentRun, new_run

from training_infra.local.imds import FakeImds

TRAIN_TORCH = REPO / "examples" / "trainer" / "train_torch.py"
TAG = "training-infra"


def quiet(server) -> None:
    """A box killed mid-request resets its connections: no traceback from the fakes' servers for that."""
    if server is not None:
        server.handle_error = lambda request, client_address: None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_of(root: Path) -> list[int]:
    """Every live process whose environment names this node's root: the agent, torchrun and the
    workers (which start their own sessions), wherever they were reparented."""
    needle = f"TI_ROOT={root}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_processes_of(root: Path) -> None:
    """A test never leaves a trainer behind."""
    for pid in processes_of(root):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Gang:
    base: AgentRun  # node 0 of attempt 1: its buckets, log group and config are the run's
    nodes: int
    members: list[AgentRun] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.base.config.run_id

    def node(self, k: int, *, attempt: int, rendezvous: str | None = None, name: str = "") -> AgentRun:
        """A new box for node `k` (not started): its launch tags, plus node and rendezvous when given
        (a replacement's launch tags carry them)."""
        if k == 0 and attempt == 1 and not self.members:
            run = self.base
            tags = run.imds.current_tags()
            run.imds.stop()
        else:
            folder = self.base.tmp.parent / (name or f"a{attempt}-node{k}-{len(self.members)}")
            folder.mkdir(parents=True)
            run = dataclasses.replace(self.base, tmp=folder, process=None, returncode=None, extra={})
            tags = {f"{TAG}:managed": "true"}
        tags |= {f"{TAG}:nodes": str(self.nodes), f"{TAG}:attempt": str(attempt)}
        if rendezvous is not None:
            tags |= {f"{TAG}:node": str(k), f"{TAG}:rendezvous": rendezvous}
        run.imds = FakeImds(instance_id=f"i-{attempt:02d}{k:02d}{len(self.members):04d}abcdef0", tags=tags).start()
        quiet(run.imds._server)
        run.env = {**self.base.env, "TI_ROOT": str(run.tmp / "root"), "AWS_EC2_METADATA_SERVICE_ENDPOINT": run.imds.url}
        self.members.append(run)
        return run

    @staticmethod
    def place(runs: list[AgentRun], rendezvous: str) -> None:
        """What the supervisor does once the fleet returned: CreateTags node=k and the rendezvous."""
        for k, run in enumerate(runs):
            run.imds.set_tag(f"{TAG}:node", str(k))
            run.imds.set_tag(f"{TAG}:rendezvous", rendezvous)

    def complete_steps(self) -> list[int]:
        """Steps complete in S3: DCP's .metadata and every node's marker."""
        prefix = f"checkpoints/{self.run_id}/"
        names = {key[len(prefix) :] for key in self.base.keys(prefix)}
        steps = {name.split("/")[0] for name in names if name.startswith("step-")}
        wanted = {".metadata", *(f".node-{k}.done" for k in range(self.nodes))}
        return sorted(int(s[5:]) for s in steps if all(f"{s}/{w}" in names for w in wanted))

    def wait_for_complete(self, at_least: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.complete_steps()
            if done and done[-1] >= at_least:
                return done[-1]
            time.sleep(0.2)
        raise AssertionError(f"no complete step >= {at_least} after {timeout}s: {self.complete_steps()}\n{self.logs()}")

    def status(self, run: AgentRun, attempt: int, k: int) -> dict:
        return json.loads(run.read(f"runs/{self.run_id}/attempts/{attempt}/nodes/{k}/status.json"))

    def logs(self) -> str:
        return "\n".join(
            f"===== {run.tmp.name} setup\n{run.setup_log[-3000:]}\n"
            f"===== {run.tmp.name} training\n{run.training_log[-3000:]}"
            for run in self.members
        )

    def close(self) -> None:
        for run in self.members:
            with contextlib.suppress(Exception):
                run.close()
            kill_processes_of(run.tmp / "root")


def new_gang(aws, run_dir: Path, *, nodes: int = 2, env: dict[str, str] | None = None, **overrides) -> Gang:
    """A run whose nodes share its AWS resources; `overrides` are AgentConfig fields."""
    settings = {
        "run_id": "gang",
        "training_command": f"{sys.executable} {TRAIN_TORCH}",
        "checkpoint_sync_seconds": 1,
        "spot_poll_seconds": 1,
        "stop_grace_seconds": 20,
        "max_runtime_seconds": 600,
        "idle_seconds": 600,
        **overrides,
    }
    base = new_run(
        aws,
        run_dir / "a1-node0",
        env={"TI_RETRY_BASE_SECONDS": "1", "TI_LOG_SHIP_SECONDS": "2", **(env or {})},
        **settings,
    )
    quiet(base.proxy._server)
    return Gang(base=base, nodes=nodes)
