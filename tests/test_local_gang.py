"""`make demo-multinode` end to end, once (module fixture): a 2-node gang on the local AWS.

Real here: the CDK deploy into moto, the supervisor's handler on EventBridge's schedule and on every EC2
state-change event (the sandbox delivers them as AWS does), the agent from the rendered user data on
every node, torchrun's c10d rendezvous, PyTorch DDP over gloo and DCP checkpoints through the local S3.
Played: each EC2 instance is a local process tree on its own loopback address (its private IP and its
IMDS's address); a spot reclaim is `local interrupt --node K` (the notice in IMDS, the warning event, the
termination when the agent has saved and exited). Not played: placement groups (moto has none; the
sandbox's supervisor runs without one) and boot times (minutes on EC2, none here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from training_infra.local.demo import GangStory, gang_story

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> GangStory:
    return gang_story(tmp_path_factory.mktemp("gang-demo"))


def test_both_nodes_of_the_first_attempt_trained(story: GangStory) -> None:
    assert sorted(b.node for b in story.first) == [0, 1]
    assert all(b.attempt == 1 and b.trained[:1] == [1] for b in story.first)


def test_a_lost_non_host_is_replaced_in_the_same_attempt_with_its_node_index(story: GangStory) -> None:
    loss = story.losses[0]
    assert (loss.path, loss.node) == ("replacement", 1)
    replacement = next(b for b in loss.resumed_on if b.node == 1)
    host = next(b for b in loss.resumed_on if b.node == 0)
    assert replacement.instance_id != loss.instance_id and replacement.attempt == 1
    assert host.instance_id == next(b.instance_id for b in story.first if b.node == 0)
    assert replacement.trained[0] == loss.resumed_from + 1, "the replacement trained on from the resumed step"


def test_every_resume_starts_from_the_newest_complete_step(story: GangStory) -> None:
    for loss in story.losses:
        assert loss.newest_complete_step > 0
        assert loss.resumed_from == loss.newest_complete_step, loss


def test_no_step_is_lost_the_gang_resumes_at_the_step_the_lost_node_trained_last(story: GangStory) -> None:
    """The trainer saves on SIGTERM at the step every rank agreed on, so the newest complete step is the step the
    lost node trained last: a resume from anything older would have lost steps beyond the newest complete one."""
    first = {b.instance_id: b for b in story.first}
    for loss in story.losses:
        lost = first[loss.instance_id]
        assert lost.trained, f"node {loss.node}'s log showed no step"
        assert loss.resumed_from == lost.trained[-1] == loss.newest_complete_step, (loss, lost.trained[-5:])


def test_a_lost_host_relaunches_the_whole_gang_as_attempt_2_counted_as_a_preemption(story: GangStory) -> None:
    loss = story.losses[1]
    assert (loss.path, loss.node) == ("whole gang", 0)
    assert sorted((b.attempt, b.node) for b in loss.resumed_on) == [(2, 0), (2, 1)]
    assert all(b.trained[0] == loss.resumed_from + 1 for b in loss.resumed_on), "attempt 2 did not start over"
    first = story.status["attempts"][0]
    assert first["end_reason"] == "reclaimed"
    assert story.status["managed"]["errors_used"] == 0  # a preemption spends none of the restarts on errors


def test_the_run_succeeds_on_attempt_2(story: GangStory) -> None:
    assert story.status["outcome"] == "succeeded"
    assert [a["end_reason"] for a in story.status["attempts"]] == ["reclaimed", "succeeded"]


def test_make_bench_prints_node_loss_to_training_again_for_both_paths(story: GangStory) -> None:
    """scripts/bench_gang_local.py's figures, from this story (its smoke pass would run a second demo)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_gang_local
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    lines = bench_gang_local.report(story, boot_minutes=5)
    print("\n".join(lines))
    replacement, whole = (loss.seconds_to_training for loss in story.losses)
    assert f"  replacement  node 1 lost: {replacement:6.1f} s here; on AWS about" in lines[1]
    assert f"  whole gang   node 0 lost: {whole:6.1f} s here; on AWS about" in lines[2]
    assert lines[3].startswith("  whole gang / replacement: ")
    assert lines[4] == "  outcome: succeeded after 2 node loss(es)"
