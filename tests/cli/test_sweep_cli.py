"""`training-infra sweep -f`, `sweep stop` and `status --group` against the stacks in the local AWS: the request
goes to the supervisor's request handler in this process (the local AWS runs no Lambda), which creates the group,
asks real Optuna for the first trials and launches them as managed runs."""

from __future__ import annotations

import json

from tests.cli.conftest import UNREACHABLE_ENDPOINT
from training_infra import naming
from training_infra import spec as run_spec
from training_infra.cli.commands.sweep import read_sweep_file
from training_infra.supervisor.runtime.records import RunStore

SWEEP_YAML = """\
group: {group}
template:
  resources: {{instance_types: [g5.xlarge], market: spot}}
  command: python train.py
  env: {{EPOCHS: "3"}}
  limits: {{max_runtime_hours: 2, max_restarts_on_errors: 1}}
space:
  lr: {{type: log-float, low: 1.0e-5, high: 1.0e-2}}
  batch: {{type: categorical, choices: [32, 64]}}
objective: {{metric: val_loss, direction: minimize}}
trials: 4
parallel: 2
max_cost_usd: 40
pruning: {{kind: median, startup_trials: 2}}
"""


def test_sweep_from_a_file_launches_the_first_members_and_status_group_lists_their_trials(stacks, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP_YAML.format(group="cli-lr"))

    result = stacks.cli("sweep", "-f", str(path))

    assert result.exit_code == 0, result.output
    assert "sweep cli-lr: 4 trial(s), 2 at once, $40.00 limit; launched cli-lr-t0, cli-lr-t1" in result.stdout
    assert len(stacks.run_instances("cli-lr-t0")) == 1 and len(stacks.run_instances("cli-lr-t1")) == 1
    shown = stacks.cli("status", "--group", "cli-lr")
    assert shown.exit_code == 0, shown.output
    assert "sweep cli-lr: running, 2 of 4 trial(s), 2 running (2 at once)" in shown.stdout
    assert "cli-lr-t0" in shown.stdout and "lr=" in shown.stdout and "batch=" in shown.stdout
    listed = json.loads(stacks.cli("status", "--group", "cli-lr", "-o", "json").stdout)
    assert [t["number"] for t in listed["trials"]] == [0, 1] and listed["max_cost_usd"] == 40

    stopped = stacks.cli("sweep", "stop", "cli-lr")
    assert stopped.exit_code == 0, stopped.output
    assert "sweep cli-lr: stopping; stopping cli-lr-t0, cli-lr-t1" in stopped.stdout


def test_a_sweep_file_with_mistakes_gets_one_error_line_each_and_asks_nobody(stacks, tmp_path):
    path = tmp_path / "sweep.yaml"
    text = SWEEP_YAML.format(group="Bad_Name").replace("trials: 4", "trails: 4").replace("log-float", "logfloat")
    path.write_text(text.replace("  command:", "  comand:"))

    result = stacks.cli("sweep", "-f", str(path), env={"AWS_ENDPOINT_URL": UNREACHABLE_ENDPOINT})

    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert all(line.startswith(f"error: {path}") for line in lines), lines
    text = "\n".join(lines)
    assert f"{path}:11: trails: unknown key; allowed: " in text and "(did you mean trials?)" in text
    # The template is a run spec, checked by launch -f's model: its line and key path under template.
    assert f"{path}:4: template.comand: got unknown key 'comand'; did you mean 'command'?" in text
    assert "group: got 'Bad_Name'" in text and "space.lr.type: got 'logfloat'" in text
    assert "trials: got None" in text


def test_launch_like_a_member_copies_its_trials_parameters_but_is_not_a_member_of_the_sweep(stacks, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP_YAML.format(group="like-src").replace("parallel: 2", "parallel: 1"))
    assert stacks.cli("sweep", "-f", str(path)).exit_code == 0

    result = stacks.cli("launch", "--like", "like-src-t0", "--run-id", "like-copy")

    assert result.exit_code == 0, result.output
    assert "note: --like like-src-t0: TI_GROUP, TI_TRIAL left out" in result.stderr
    store = RunStore(stacks.client("dynamodb"), stacks.outputs[naming.OUTPUT_RUN_TABLE])
    member, copy = store.get("like-src-t0"), store.get("like-copy")
    assert copy.group == "" and copy.trial is None, "the copy is not a trial: the sweep never counts or stops it"
    copied = run_spec.parse(copy.spec_yaml).env
    assert "TI_GROUP" not in copied and "TI_TRIAL" not in copied
    assert copied["TI_PARAMS"] == run_spec.parse(member.spec_yaml).env["TI_PARAMS"], "the trial's parameters kept"
    assert stacks.cli("sweep", "stop", "like-src").exit_code == 0


def test_a_missing_sweep_file_is_the_same_usage_line_as_launch_f(stacks, tmp_path):
    path = tmp_path / "absent.yaml"

    sweep = stacks.cli("sweep", "-f", str(path), env={"AWS_ENDPOINT_URL": UNREACHABLE_ENDPOINT})
    launch = stacks.cli("launch", "-f", str(path), env={"AWS_ENDPOINT_URL": UNREACHABLE_ENDPOINT})

    assert sweep.exit_code == launch.exit_code == 2
    assert sweep.stderr == launch.stderr == f"error: {path}: cannot read it (No such file or directory)\n"


def test_a_run_spec_template_becomes_the_members_launch_request(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP_YAML.format(group="shape").replace("max_restarts_on_errors: 1", "stall_minutes: 20"))

    group, body = read_sweep_file(path)

    assert group == "shape"
    assert body["template"] == {
        "instance_types": ["g5.xlarge"], "market": "spot", "command": "python train.py", "env": ["EPOCHS=3"],
        "secrets": [], "max_runtime_hours": 2, "stall_seconds": 1200,
    }  # fmt: skip


def test_a_template_without_instance_types_gets_the_stacks_like_launch(stacks, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP_YAML.format(group="cli-types").replace("instance_types: [g5.xlarge], ", ""))

    result = stacks.cli("sweep", "-f", str(path))

    assert result.exit_code == 0, result.output
    assert "launched cli-types-t0, cli-types-t1" in result.stdout
    from training_infra import naming
    from training_infra.supervisor.runtime.records import RunStore

    member = RunStore(stacks.client("dynamodb"), stacks.outputs[naming.OUTPUT_RUN_TABLE]).get("cli-types-t0")
    published = stacks.outputs[naming.OUTPUT_INSTANCE_TYPES].split(",")
    assert list(member.spec.instance_types) == published
    stacks.cli("sweep", "stop", "cli-types")


def test_a_sweep_whose_image_is_not_pushed_is_refused_by_launchs_preflight_and_creates_no_group(stacks, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP_YAML.format(group="cli-noimage").replace("  command:", "  image: never-pushed\n  command:"))

    result = stacks.cli("sweep", "-f", str(path))

    assert result.exit_code != 0 and "never-pushed" in result.stderr, result.output
    assert "no such group" in stacks.cli("status", "--group", "cli-noimage").stderr


def test_a_sweep_whose_first_launch_is_refused_exits_1_with_the_groups_reason(stacks, tmp_path, monkeypatch):
    from training_infra.supervisor.runtime import sweeps
    from training_infra.supervisor.runtime.run_requests import Refused

    def refuse(self, request):
        raise Refused("option '--command': got 'python train.py'; allowed: a command the stack runs", usage=True)

    monkeypatch.setattr(sweeps.Launcher, "launch", refuse)  # a refusal only the request function can find
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP_YAML.format(group="cli-refused"))

    result = stacks.cli("sweep", "-f", str(path))

    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: sweep cli-refused: stopped: trial 0 not launched: option '--command'"), lines
    assert "launched none yet" not in result.stdout
