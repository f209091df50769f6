"""`launch -f run.yaml`, `launch --like RUN`, `launch --dry-run -f` and `schema` (training_infra/cli/spec_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from training_infra import naming
from training_infra import spec as run_spec
from training_infra.cli import launching, spec_cli
from training_infra.supervisor.runtime.records import RunStore

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "specs"

FULL_SPEC = """\
run_id: spec-equal
resources:
  instance_types: [g5.xlarge, g6.xlarge]
  market: spot-then-on-demand
  max_price: 1.5
  subnet_id: subnet-0123456789abcdef0
image: v2
command: python train.py --lr 3e-4
env: {EPOCHS: 3, WANDB_MODE: offline}
secrets: {WANDB_API_KEY: "ssm:/training-infra/wandb"}
limits: {max_runtime_hours: 2, max_cost_usd: 9, stall_minutes: 7, max_restarts_on_errors: 2}
data: {allow_empty: true, access: mount}
"""
EQUIVALENT_FLAGS = dict(
    run_id="spec-equal", instance_types="g5.xlarge,g6.xlarge", market="spot-then-on-demand", max_price="1.5",
    subnet_id="subnet-0123456789abcdef0", image_tag="v2", command="python train.py --lr 3e-4",
    env=["EPOCHS=3", "WANDB_MODE=offline"], secret_refs=["WANDB_API_KEY=ssm:/training-infra/wandb"],
    max_runtime_hours="2", max_cost_usd="9", stall_minutes="7", max_restarts_on_errors="2", allow_empty_data=True,
    data_access="mount",
)  # fmt: skip


def _from_file(tmp_path: Path, text: str, **flags) -> launching.LaunchRequest:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    given = launching.validate(launching.LaunchRequest(**flags))
    return spec_cli.request_for(None, given, file=path)


def _resolved(request: launching.LaunchRequest) -> run_spec.LaunchSpec:
    return run_spec.resolve(request.spec_layers)[0]


def test_launch_f_and_the_equivalent_flags_give_the_same_request_and_spec(tmp_path):
    from_file = _from_file(tmp_path, FULL_SPEC)
    from_flags = spec_cli.request_for(None, launching.validate(launching.LaunchRequest(**EQUIVALENT_FLAGS)))
    assert from_file == from_flags
    assert _resolved(from_file) == _resolved(from_flags) == run_spec.parse(FULL_SPEC)


def test_flags_override_the_file_key_by_key_and_env_entry_by_entry(tmp_path):
    request = _from_file(
        tmp_path, FULL_SPEC, max_runtime_hours="1", env=["EPOCHS=5"], spot=False, instance_type="g6.xlarge"
    )
    assert request.max_runtime_hours == 1 and request.market == "on-demand" and request.instance_types == "g6.xlarge"
    assert request.env == ["EPOCHS=5", "WANDB_MODE=offline"], "the flag's EPOCHS wins, the file's other keys stay"
    assert request.image_tag == "v2" and request.max_cost_usd == 9, "what no flag set comes from the file"
    spec, sources = run_spec.resolve(request.spec_layers)
    assert spec.limits.max_runtime_hours == 1 and spec.limits.stall_minutes == 7
    assert sources["limits.max_runtime_hours"] == "flag"
    assert sources["limits.stall_minutes"] == str(tmp_path / "run.yaml")


def test_a_multi_node_spec_launches_a_gang_and_nodes_given_by_flag_or_file_is_the_same_request(tmp_path):
    from_file = _from_file(tmp_path, (EXAMPLES / "multi-node.yaml").read_text())
    assert int(from_file.nodes) == 4
    assert _from_file(tmp_path, FULL_SPEC, nodes="3").nodes == 3, "the --nodes flag overrides the file"
    assert _from_file(tmp_path, FULL_SPEC).nodes is None, "one node sends no nodes (a single-node request)"


def test_launch_f_with_mistakes_prints_one_line_each_and_calls_no_aws(stacks, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("resources:\n  instance_type: g5.xlarge\nlimits:\n  max_runtime_hours: 500\n")
    result = stacks.cli("launch", "-f", str(path), env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {path}:2: resources.instance_type: got unknown key 'instance_type'; did you mean 'instance_types'? "
        "allowed: instance_types, nodes, market, max_price, subnet_id, capacity_reservation, nccl_efa_check",
        f"error: {path}:4: limits.max_runtime_hours: got 500; allowed: a number greater than 0 up to 168",
    ]


def test_a_yaml_syntax_error_in_launch_f_is_one_line_with_file_and_line(stacks, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("image: v2\nenv: {A: 1\n")
    result = stacks.cli("launch", "-f", str(path), env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {path}:3: not valid YAML: ")


def test_launch_f_and_like_together_are_refused(stacks, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("image: v2\n")
    assert "options '--file' and '--like': give one" in stacks.usage_error("launch", "-f", str(path), "--like", "x")


def test_dry_run_prints_the_resolved_spec_saying_where_each_value_came_from(stacks, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("resources:\n  instance_types: [g5.xlarge]\nimage: v2\nlimits:\n  max_runtime_hours: 3\n")
    result = stacks.cli("launch", "--dry-run", "-f", str(path), "--max-runtime-hours", "2", "--run-id", "spec-dry")
    assert result.exit_code == 0, result.output
    text = result.stdout.split("\n\n", 1)[0]
    assert text.startswith(f"# the resolved spec ({path}, flags over it, the stack's defaults for the rest)")
    lines = text.splitlines()
    assert "run_id: spec-dry  # flag --run-id" in lines
    assert "  instance_types: [g5.xlarge]  # " + str(path) in lines
    assert "  market: spot  # stack default" in lines
    assert "image: v2  # " + str(path) in lines
    assert "  max_runtime_hours: 2.0  # flag --max-runtime-hours" in lines
    assert "  max_restarts_on_errors: 0  # stack default" in lines
    printed = run_spec.parse(text)  # what it prints is a spec one can save and launch
    assert printed.limits.max_runtime_hours == 2 and printed.image == "v2"
    assert "preflight passed for run spec-dry" in result.stdout
    assert stacks.run_instances("spec-dry") == [], "--dry-run creates nothing"


def test_launch_f_keeps_the_resolved_spec_in_the_record_and_at_runs_id_spec_yaml(stacks, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("group: g1\nimage: v2\nenv: {EPOCHS: 3}\nsecrets: {TOKEN: 'ssm:/training-infra/t'}\n")
    result = stacks.cli("launch", "-f", str(path), "--run-id", "spec-kept", "--stall-minutes", "9")
    assert result.exit_code == 0, result.output
    record = RunStore(stacks.client("dynamodb"), stacks.outputs[naming.OUTPUT_RUN_TABLE]).get("spec-kept")
    kept = run_spec.parse(record.spec_yaml)
    assert (kept.run_id, kept.group, kept.image, kept.env, kept.limits.stall_minutes) == (
        "spec-kept", "g1", "v2", {"EPOCHS": "3"}, 9,
    )  # fmt: skip
    assert kept.secrets == {"TOKEN": "ssm:/training-infra/t"}, "the reference, never a value"
    assert kept.resources.instance_types and kept.limits.max_runtime_hours == 12, "the stack's defaults filled in"
    body = stacks.client("s3").get_object(Bucket=stacks.outputs_bucket, Key="runs/spec-kept/spec.yaml")["Body"]
    assert body.read().decode() == record.spec_yaml


def test_launch_like_starts_a_copy_with_flags_changing_it(stacks, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("image: v2\ncommand: python train.py\nenv: {LR: '0.1'}\nlimits: {stall_minutes: 11}\n")
    first = stacks.cli("launch", "-f", str(path), "--run-id", "spec-orig")
    assert first.exit_code == 0, first.output
    result = stacks.cli("launch", "--like", "spec-orig", "--run-id", "spec-copy", "--env", "LR=0.2")
    assert result.exit_code == 0, result.output
    store = RunStore(stacks.client("dynamodb"), stacks.outputs[naming.OUTPUT_RUN_TABLE])
    orig, copy = (run_spec.parse(store.get(run).spec_yaml) for run in ("spec-orig", "spec-copy"))
    assert copy.run_id == "spec-copy"
    assert copy.env == {"LR": "0.2"}, "the flag changed the copy"
    assert copy.model_copy(update={"run_id": "spec-orig", "env": orig.env}) == orig, "everything else copied"
    assert store.get("spec-copy").spec.image_tag == "v2" and store.get("spec-copy").spec.stall_seconds == 660


def test_like_an_unknown_run_says_so_in_one_line(stacks):
    result = stacks.cli("launch", "--like", "no-such-run")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "option '--like': no run no-such-run in the run table" in result.stderr


def test_schema_prints_the_models_json_schema(stacks):
    result = stacks.cli("schema", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == run_spec.json_schema()


def test_the_resolved_spec_printed_is_yaml_with_the_same_values():
    spec = run_spec.parse(FULL_SPEC)
    lines = spec_cli.commented_yaml(spec.to_data(), {"image": "run.yaml"})
    assert "image: v2  # run.yaml" in lines
    assert run_spec.validate(yaml.safe_load("\n".join(lines))) == spec


def test_like_copies_a_run_from_before_specs_were_kept_from_its_record():
    from training_infra.supervisor.runtime.records import RunSpec

    old = RunSpec(
        instance_types=("g5.xlarge",), market="on-demand", max_runtime_hours=4.0, max_restarts_on_errors=1,
        stall_seconds=600, image_tag="v2", command="python train.py", max_price_usd=0.9, max_cost_usd=5.0,
    )  # fmt: skip
    copied = run_spec.validate(spec_cli._spec_of_record(old))
    assert copied.resources.instance_types == ["g5.xlarge"] and copied.resources.market == "on-demand"
    assert (copied.limits.max_runtime_hours, copied.limits.stall_minutes, copied.limits.max_cost_usd) == (4, 10, 5)
    assert (copied.image, copied.command, copied.resources.max_price) == ("v2", "python train.py", 0.9)
    assert copied.env == {} and copied.secrets == {}, "env and secrets were never kept before specs"


def test_launch_like_a_run_id_that_cannot_be_one_is_one_line_before_any_aws_call(stacks):
    result = stacks.cli("launch", "--like", "../x", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})

    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "option '--like': got '../x'" in result.stderr
