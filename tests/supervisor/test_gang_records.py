"""Gang records and requests in plain Python (no AWS, no synth): what is stored, what is refused, in one line."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.supervisor.test_records import TODAY, _item, _plain
from training_infra.config import ConfigError, parse_settings
from training_infra.supervisor.runtime.records import AttemptEnd, MemberState, Run, RunSpec
from training_infra.supervisor.runtime.run_requests import LaunchRequest, Refused, plan_money, run_seal
from training_infra.supervisor.runtime.supervisor import SupervisorConfig

NOW = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
HOST, OTHER, SPARE = "i-0123456789abcdef0", "i-0123456789abcdef1", "i-0123456789abcdef2"
GANG = {
    **TODAY,
    "spec": {**TODAY["spec"], "nodes": 2},
    "attempts": [{
        "n": 1, "why": "first launch", "claimed_at": "2026-11-29T08:00:00Z", "instance_id": HOST,
        "instance_type": "g5.12xlarge", "zone": "us-east-1a", "subnet_id": TODAY["spec"]["subnet_ids"][0],
        "market": "spot", "started_at": "2026-11-29T08:00:05Z", "placement_group": "training-infra-run-bert-1",
        "launch_template_version": "2", "members": [
            {"node": 0, "instance_id": HOST, "instance_type": "g5.12xlarge", "zone": "us-east-1a",
             "private_ip": "10.0.1.5", "market": "spot", "state": "running", "started_at": "2026-11-29T08:00:05Z"},
            {"node": 1, "instance_id": OTHER, "instance_type": "g5.12xlarge", "zone": "us-east-1a",
             "private_ip": "10.0.1.6", "market": "spot", "state": "replaced", "started_at": "2026-11-29T08:00:05Z",
             "ended_at": "2026-11-29T09:00:00Z", "end_reason": "reclaimed", "priced": True, "cost_usd": 1.5},
            {"node": 1, "instance_id": SPARE, "instance_type": "g5.12xlarge", "zone": "us-east-1a",
             "private_ip": "10.0.1.7", "market": "spot", "state": "running", "started_at": "2026-11-29T09:02:00Z"},
        ],
    }],
}  # fmt: skip


def test_a_single_node_record_has_one_node_and_is_written_back_without_nodes_or_members():
    run = Run.from_item(_item(TODAY))
    assert run.spec.nodes == 1 and all(a.members == [] for a in run.attempts)
    written = _plain(run.to_item())
    assert "nodes" not in written["spec"] and all("members" not in a for a in written["attempts"])


def test_a_gang_record_reads_its_members_typed_and_writes_them_back_unchanged():
    run = Run.from_item(_item(GANG))
    assert run.problem == "" and run.spec.nodes == 2
    attempt = run.attempts[0]
    assert [(m.node, m.state) for m in attempt.members] == [
        (0, MemberState.RUNNING), (1, MemberState.REPLACED), (1, MemberState.RUNNING)]  # fmt: skip
    assert attempt.members[1].end_reason is AttemptEnd.RECLAIMED and attempt.live_member(1).instance_id == SPARE
    written = _plain(run.to_item())
    assert written["attempts"] == _plain(_item(GANG))["attempts"] and written["spec"]["nodes"] == 2


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"spec": {**GANG["spec"], "nodes": 0}}, "spec.nodes: got 0; allowed: a whole number from 1 to 64"),
        ({"spec": {**GANG["spec"], "nodes": "2"}}, "spec.nodes: got '2'"),
        ({"attempts": [{**GANG["attempts"][0], "members": [{"node": 0, "instance_id": "vol-1"}]}]},
         "attempts[0].members[0].instance_id: got 'vol-1'; allowed: an instance id"),
        ({"attempts": [{**GANG["attempts"][0], "members": [{"node": 99, "instance_id": HOST}]}]},
         "attempts[0].members[0].node: got 99"),
        ({"attempts": [{**GANG["attempts"][0], "members": [{"node": 0, "instance_id": HOST, "state": "zombie"}]}]},
         "attempts[0].members[0].state: got 'zombie'"),
    ],
)  # fmt: skip
def test_a_gang_record_the_supervisor_would_not_write_reads_with_its_problem(change, problem):
    run = Run.from_item(_item({**GANG, **change}))
    assert run.problem.startswith(problem)


@pytest.mark.parametrize("nodes", [0, 65, "2", True, 1.5])
def test_launch_nodes_out_of_range_is_refused_in_one_line_naming_the_option_and_value(nodes):
    event = {"run_id": "bert", "market": "spot", "nodes": nodes}
    with pytest.raises(Refused) as caught:
        LaunchRequest.from_event(event)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"option '--nodes': got {nodes!r}; allowed:")
    assert caught.value.usage


def test_a_gang_larger_than_the_stacks_max_nodes_breaks_its_limits():
    cfg = SupervisorConfig(table="t", outputs_bucket="b", max_nodes=4, allowed_instance_types="g5.*")
    spec = RunSpec(instance_types=("g5.12xlarge",), nodes=5)
    problems = cfg.limit_problems(spec, "2026-11-29T10:00:00Z", NOW)
    assert "nodes 5: allowed: 1 to the stack's max_nodes 4" in problems
    assert not [p for p in cfg.limit_problems(RunSpec(instance_types=("g5.12xlarge",), nodes=4),
                                              "2026-11-29T10:00:00Z", NOW) if p.startswith("nodes")]  # fmt: skip


def test_a_gangs_size_is_sealed_and_a_single_node_seal_is_unchanged():
    one, also_one, two = RunSpec(), RunSpec(nodes=1), RunSpec(nodes=2)
    assert run_seal(one, "x") == run_seal(also_one, "x") != run_seal(two, "x")


def test_a_gangs_money_is_every_member_for_the_whole_runtime():
    cfg = SupervisorConfig(table="t", outputs_bucket="b", monthly_limit_usd=10_000)
    one = plan_money(cfg, ("g5.12xlarge",), {"g5.12xlarge": 5.672}, 0, 10, None, None)
    four = plan_money(cfg, ("g5.12xlarge",), {"g5.12xlarge": 5.672}, 0, 10, None, None, 4)
    assert four.reserve_usd == pytest.approx(4 * one.reserve_usd) and four.hourly_usd == pytest.approx(4 * 5.672)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [({"max_nodes": "0"}, "'max_nodes'"), ({"max_nodes": "65"}, "'65'"),
     ({"gang_replace_timeout_minutes": "0"}, "'gang_replace_timeout_minutes'"),
     ({"gang_replace_timeout_minutes": "2.5"}, "'2.5'")],
)  # fmt: skip
def test_gang_settings_out_of_range_give_one_line(raw, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw)
    assert "\n" not in str(caught.value) and fragment in str(caught.value) and "allowed:" in str(caught.value)


def test_gang_settings_defaults_are_documented_values():
    settings = parse_settings({})
    assert settings.max_nodes == 8 and settings.gang_replace_timeout_minutes == 10
