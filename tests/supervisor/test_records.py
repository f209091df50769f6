"""The run record is parsed once where the store reads it and serialised once where it writes it: the item
format in a deployed table stays what it was, typed values in between (records.py)."""

from __future__ import annotations

import json
from decimal import Decimal

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from training_infra.supervisor.runtime.records import AttemptEnd, Run, RunState

SUBNET, TEMPLATE = "subnet-0a1b2c3d4e5f60718", "lt-0a1b2c3d4e5f60718"
# A run as the code before typed records wrote it (run_requests + supervisor): a reclaimed and priced attempt,
# a streak of capacity failures, and an open attempt on a box whose status checks went impaired.
TODAY = {
    "run_id": "bert", "kind": "run", "created_at": "2026-11-29T08:00:00Z", "state": "running", "version": 7,
    "spec": {
        "instance_types": ["g5.xlarge", "g6.xlarge"], "subnet_ids": [SUBNET], "market": "spot-then-on-demand",
        "max_runtime_hours": 6.0, "launch_template_id": TEMPLATE, "launch_template_version": "1",
        "owns_launch_template": True, "max_restarts_on_errors": 2, "checkpoint_sync_seconds": 300,
        "stall_seconds": 900, "image_tag": "v3", "command": "python train.py",
        "instance_tags": {"training-infra:run-id": "bert", "Name": "training-infra-bert"},
        "list_prices": {"g5.xlarge": 1.006, "g6.xlarge": 0.805}, "volume_gb": 200, "max_cost_usd": 40.0,
        "budget_month": "#month-2026-11", "reserved_usd": 40.0, "spent_before_usd": 0.0,
    },
    "deadline_at": "2026-11-29T14:00:00Z",
    "attempts": [
        {"n": 1, "why": "first launch", "claimed_at": "2026-11-29T08:00:00Z", "instance_id": "i-0123456789abcdef0",
         "instance_type": "g5.xlarge", "zone": "us-east-1a", "subnet_id": SUBNET, "market": "spot",
         "started_at": "2026-11-29T08:00:05Z", "reclaim_warned_at": "2026-11-29T09:58:00Z",
         "ended_at": "2026-11-29T10:00:00Z", "end_reason": "reclaimed", "message": "spot reclaimed by AWS",
         "exit_code": None, "price_usd": 1.006, "priced": True, "cost_usd": 0.61, "on_demand_usd": 2.0119,
         "hourly_usd": 0.3, "price_source": "spot history"},
        {"n": 2, "why": "spot reclaimed by AWS", "claimed_at": "2026-11-29T10:00:00Z",
         "ended_at": "2026-11-29T10:03:00Z", "end_reason": "capacity", "message": "no capacity: X in 2 pool(s)",
         "errors": [{"market": "spot", "code": "InsufficientInstanceCapacity", "message": "none",
                     "pool": "g5.xlarge@us-east-1a"}], "tries": 3},
        {"n": 3, "why": "spot reclaimed by AWS", "claimed_at": "2026-11-29T10:04:00Z",
         "instance_id": "i-0fedcba9876543210", "instance_type": "g6.xlarge", "zone": "us-east-1a",
         "subnet_id": SUBNET, "market": "on-demand", "started_at": "2026-11-29T10:04:02Z",
         "impaired_since": "2026-11-29T11:00:00Z"},
    ],
    "errors_used": 0, "cooldown": {"g5.xlarge@us-east-1a": "2026-11-29T10:30:00Z"}, "stop_requested_at": "",
    "stop_reason": "", "message": "attempt 3 on g6.xlarge in us-east-1a (on-demand)", "ended_at": "",
    "spent_usd": 0.61, "summary": {"complete": False, "tries": 2}, "active": "1",
}  # fmt: skip


def _item(values: dict) -> dict:
    """Plain values as DynamoDB attribute values, the way boto3 writes them (numbers as Decimal)."""
    plain = json.loads(json.dumps(values), parse_float=Decimal)
    return {key: TypeSerializer().serialize(value) for key, value in plain.items()}


def _plain(item: dict) -> dict:
    """An item back as plain values, nulls dropped (a null and an absent key read the same)."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {key: clean(TypeDeserializer().deserialize(value)) for key, value in item.items()}


def test_a_record_written_in_todays_format_reads_as_typed_values():
    run = Run.from_item(_item(TODAY))

    assert run.problem == ""
    assert run.state is RunState.RUNNING and run.active
    assert run.spec.instance_types == ("g5.xlarge", "g6.xlarge") and run.spec.max_cost_usd == 40.0
    assert [a.end_reason for a in run.attempts] == [AttemptEnd.RECLAIMED, AttemptEnd.CAPACITY, None]
    assert run.attempts[0].cost_usd == 0.61 and run.attempts[0].priced
    assert run.attempts[1].tries == 3 and run.attempts[1].errors[0]["code"] == "InsufficientInstanceCapacity"
    assert run.current is run.attempts[2] and run.current.impaired_since == "2026-11-29T11:00:00Z"
    assert [a.n for a in run.launched] == [1, 3]


def test_a_record_written_in_todays_format_is_written_back_with_the_same_keys_and_values():
    written = _plain(Run.from_item(_item(TODAY)).to_item())
    before = _plain(_item(TODAY))

    assert {k: v for k, v in written.items() if k != "summary"} == {k: v for k, v in before.items() if k != "summary"}
    assert written["summary"]["tries"] == 2 and written["summary"]["cost_usd"] == Decimal("0.61")


def test_a_run_imported_from_its_status_json_reads_without_subnets_or_template():
    imported = {
        "run_id": "old-run", "kind": "run", "created_at": "2026-10-01T08:00:00Z", "state": "interrupted",
        "version": 1, "deadline_at": "", "errors_used": 0, "cooldown": {}, "message": "spot interrupted",
        "spec": {"imported_from": "status.json", "market": "spot", "instance_types": ["g5.xlarge"],
                 "list_prices": {"g5.xlarge": 1.006}},
        "attempts": [{"n": 1, "instance_id": "i-0123456789abcdef0", "instance_type": "g5.xlarge",
                      "zone": "us-east-1a", "market": "spot", "started_at": "2026-10-01T08:00:00Z",
                      "ended_at": "2026-10-01T09:00:00Z", "end_reason": "interrupted", "exit_code": None,
                      "message": None, "price_usd": 1.006, "priced": True, "cost_usd": 0.3, "on_demand_usd": 1.006,
                      "hourly_usd": 0.3, "price_source": "spot history"}],
    }  # fmt: skip

    run = Run.from_item(_item(imported))

    assert run.problem == "" and run.state is RunState.INTERRUPTED and not run.active
    assert run.spec.imported_from == "status.json" and run.attempts[0].end_reason is AttemptEnd.INTERRUPTED
    assert _plain(run.to_item())["spec"] == _plain(_item(imported))["spec"], (
        "an imported spec is written back as it was"
    )


def test_a_malformed_record_reads_with_its_problem_and_is_written_back_as_stored_but_for_its_new_state():
    forged = {**TODAY, "spec": {**TODAY["spec"], "max_restarts_on_errors": 100000, "extra": "x"}}

    run = Run.from_item(_item(forged))
    assert run.problem.startswith("spec: got ['extra']")
    run.state, run.message = RunState.INVALID, "not acted on"
    written = _plain(run.to_item())

    assert written["spec"] == _plain(_item(forged))["spec"] and written["attempts"] == _plain(_item(forged))["attempts"]
    assert written["state"] == "invalid" and written["message"] == "not acted on" and "active" not in written


def test_a_record_with_an_unknown_state_is_never_active():
    run = Run.from_item(_item({**TODAY, "state": "sprinting"}))

    assert run.state is RunState.INVALID and not run.active
    assert run.problem == "record.state: got 'sprinting'; allowed: " + ", ".join(RunState)


def test_the_store_reads_a_record_put_in_todays_format_and_keeps_it_in_the_active_index(account):
    account.dynamodb.put_item(TableName=account.table, Item=_item(TODAY))

    run = account.supervisor().store.get("bert")

    assert run.problem == "" and run.attempts[1].end_reason is AttemptEnd.CAPACITY
    assert [r.run_id for r in account.supervisor().store.active()] == ["bert"]
