"""A sweep member's parameters reach its trainer as a JSON file too (issue 26): the agent writes the TI_PARAMS
line of the run's environment to params.json in the progress folder and names it in TI_PARAMS_FILE, in both
runtimes (the container sees the folder where it is mounted)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.agent.test_agent_security import docker_run_call, fake_docker_run

PARAMS = {"lr": 0.001, "optimizer": "adam", "layers": 4}
ENV_LINE = "TI_PARAMS=" + json.dumps(PARAMS, sort_keys=True, separators=(",", ":"))


def test_a_process_trainer_reads_its_trials_parameters_from_the_file_named_in_ti_params_file(make_run):
    run = make_run(run_id="params", extra_env=ENV_LINE,
                   training_command='cp "$TI_PARAMS_FILE" "$OUTPUT_DIR/got.json"')  # fmt: skip
    run.run(timeout=60)

    assert run.status()["outcome"] == "succeeded", run.setup_log
    assert json.loads(run.read("runs/params/outputs/got.json")) == PARAMS


def test_a_container_trainer_gets_ti_params_file_at_the_mounted_progress_folder(make_run):
    run = fake_docker_run(make_run, run_id="ctr-params", extra_env=ENV_LINE, training_command="python train.py")
    run.run(timeout=60)

    argv = docker_run_call(run)["argv"]
    assert run.status()["outcome"] == "succeeded", run.setup_log
    env = [argv[i + 1] for i, a in enumerate(argv) if a == "-e"]
    assert "TI_PARAMS_FILE=/run/training-infra/progress/params.json" in env
    host = next(a.split(":")[0] for a in argv if a.endswith(":/run/training-infra/progress"))
    assert json.loads(Path(host, "params.json").read_text()) == PARAMS


def test_a_run_without_parameters_gets_no_ti_params_file(make_run):
    run = make_run(run_id="no-params", training_command='echo "${TI_PARAMS_FILE-unset}" > "$OUTPUT_DIR/got.txt"')
    run.run(timeout=60)

    assert run.status()["outcome"] == "succeeded", run.setup_log
    assert run.read("runs/no-params/outputs/got.txt").strip() == "unset"
