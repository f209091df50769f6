"""Two-node runs with the real engine: two real agents, each with its own fake IMDS and root, the moto
server's S3, torchrun (c10d) and a real two-node DDP PyTorch trainer over gloo that checkpoints with DCP.

The SUPERVISOR IS PLAYED by the test (tests/agent/gang_harness.py): it sets the tags the supervisor
sets once the fleet returned (node index, rendezvous), starts the replacement with them in its launch
tags, and stops the survivors of a lost host before it launches the next attempt. The lead connects
this to the real supervisor (training_infra/supervisor/runtime/gang.py) once both sides have landed.

What only this test proves (the agent's side, seen from inside each node): the agents wait for their tags
before any trainer starts, the spot notice leaves no trainer process behind (torchrun's workers included),
the survivor keeps its agent and torchrun while its workers resume with the replacement, and the per-node
S3 layout and log streams. The host's loss and the whole gang's relaunch as attempt 2 run end to end with the
real supervisor in tests/test_local_gang.py (so they are not repeated here); the launch, tag and NCCL rules
are unit tests in test_agent_gang_rules.py.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from gang_harness import Gang, free_port, new_gang, processes_of

from training_infra.local.emulator import Emulator

pytest.importorskip("torch")

TRAINING = "STEPS=400\nSTEP_SECONDS=0.25\nCHECKPOINT_EVERY=4\nKEEP_CHECKPOINTS=3"


@pytest.fixture
def gang(aws: Emulator, tmp_path) -> Gang:
    made = new_gang(aws, tmp_path, extra_env=TRAINING)
    yield made
    made.close()


def steps_logged(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"\] step (\d+)/", log)]


def wait_for(pattern: str, run, timeout: float = 60, after: int = 0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, run.training_log[after:])
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(
        f"{pattern!r} not in {run.tmp.name}'s training log after {timeout}s:\n{run.training_log[-4000:]}"
    )


@pytest.mark.slow
def test_a_gang_trains_loses_a_worker_node_and_its_replacement_and_the_survivor_resume_from_the_step_saved(gang):
    # (a) Two nodes boot; the supervisor tags them once the fleet returned; they meet and train.
    rendezvous = f"127.0.0.1:{free_port()}"
    node0, node1 = gang.node(0, attempt=1), gang.node(1, attempt=1)
    node0.start(), node1.start()
    deadline = time.monotonic() + 30
    while not all("gang of 2 nodes: waiting" in run.setup_log for run in (node0, node1)):
        assert time.monotonic() < deadline, gang.logs()
        time.sleep(0.2)
    # Both agents wait for their place (no trainer yet); the fleet "returns" now.
    assert "starting trainer" not in node0.training_log + node1.training_log
    Gang.place([node0, node1], rendezvous)
    first = gang.wait_for_complete(at_least=3)
    assert "[trainer rank 0] joined the process group: 2 ranks" in node0.training_log + node1.training_log
    assert "wrapped in torchrun (1 per node)" in node0.training_log and "--rdzv-id gang-1" in node0.training_log
    assert re.search(r"node 1 of 2 \(rendezvous 127\.0\.0\.1:\d+, id gang-1\)", node1.training_log)

    # (b) Node 1 (not the host) gets the spot notice: the gang saves, node 1 ends as a preemption.
    node1.imds.inject_spot_interruption()
    node1.wait(timeout=60)
    assert processes_of(node1.root) == [], "the agent left nothing of the trainer (torchrun's workers included)"
    saved = int(re.findall(r"checkpoint step-(\d+)", node1.training_log)[-1])
    assert saved >= first and max(steps_logged(node1.training_log)) == saved, "node 1 saved its last step on SIGTERM"
    assert gang.status(node1, 1, 1)["outcome"] == "interrupted", gang.logs()
    assert gang.wait_for_complete(at_least=saved) == saved, "node 0 uploaded its part of the step saved on SIGTERM"
    # The supervisor launches one replacement, same attempt, node 1 and the rendezvous in its launch tags.
    survivor_log = len(node0.training_log)
    replacement = gang.node(1, attempt=1, rendezvous=rendezvous, name="a1-node1-replacement").start()
    wait_for(rf"resumed from step-{saved:06d} \(step {saved}\)", replacement, timeout=90)
    wait_for(rf"resumed from step-{saved:06d} \(step {saved}\)", node0, timeout=30, after=survivor_log)
    wait_for(rf"\] step {saved + 2}/", replacement, timeout=30)
    assert node0.process.poll() is None, "the survivor kept its agent and torchrun: no whole-gang restart"

    # The supervisor's whole-gang stop (its stop tag on every live member): both end `stopped`, nothing left.
    for run in (node0, replacement):
        run.imds.set_tag("training-infra:stop", "gang")
    for run in (node0, replacement):
        run.wait(timeout=60)
        assert processes_of(run.root) == []
    assert gang.status(node0, 1, 0)["outcome"] == "stopped", gang.logs()

    # Per-node records and streams (the contract's layout): node k under attempts/<n>/nodes/<k>/.
    keys = gang.base.keys("runs/gang/attempts/1/nodes/")
    assert {"runs/gang/attempts/1/nodes/0/status.json", "runs/gang/attempts/1/nodes/1/status.json"} <= set(keys)
    assert any(k.startswith("runs/gang/attempts/1/nodes/1/logs/") for k in keys)
    streams = (
        gang.base.extra["session"]
        .client("logs", endpoint_url=gang.base.aws.endpoint)
        .describe_log_streams(logGroupName=gang.base.config.log_group)["logStreams"]
    )
    assert {"gang", "gang/node-1"} <= {s["logStreamName"] for s in streams}
    manifest = json.loads(gang.base.read("checkpoints/gang/_manifest.node-1.json"))
    assert manifest["node"] == 1 and all(
        name.endswith(".distcp") or name == ".metadata" for step in manifest["steps"].values() for name in step
    )
