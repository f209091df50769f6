"""A gang's launch rules without AWS (issue 25): the command must run as one torchrun job on every node, and the
NCCL-uses-EFA check has a switch; in the flags and in the run spec, one line each, before any AWS call."""

from __future__ import annotations

import pytest

from training_infra import spec as run_spec
from training_infra.cli import launching, spec_cli
from training_infra.cli.errors import UsageError


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("python train.py | tee log", "'|' outside quotes"),
        ("bash run.sh", "'bash' is neither python nor torchrun"),
        ("python -c 'import t'", "python -c runs no script"),
    ],
)
def test_a_gang_command_that_cannot_run_as_one_torchrun_job_is_one_usage_line_before_any_aws_call(command, why):
    with pytest.raises(UsageError) as caught:
        launching.validate(launching.LaunchRequest(nodes="3", command=command))
    message = str(caught.value)
    assert message.startswith(f"option '--command': got {command!r}; allowed: with 3 nodes, python [python's flags]")
    assert why in message and "\n" not in message


@pytest.mark.parametrize("command", ["python -u train.py --lr 1", "torchrun --nproc-per-node 8 train.py"])
def test_a_wrappable_or_torchrun_gang_command_and_any_single_node_command_pass(command):
    assert launching.validate(launching.LaunchRequest(nodes="2", command=command)).command == command
    assert launching.validate(launching.LaunchRequest(command="bash run.sh | tee x")).command == "bash run.sh | tee x"


def test_a_spec_with_nodes_refuses_a_command_that_cannot_run_on_every_node_naming_its_line():
    with pytest.raises(run_spec.SpecError) as caught:
        run_spec.parse("resources:\n  nodes: 2\ncommand: bash run.sh\n", source="run.yaml")
    [line] = caught.value.lines
    assert line.startswith("run.yaml:3: command: got 'bash run.sh'; allowed: with 2 nodes, python")
    assert run_spec.parse("command: bash run.sh\n").command == "bash run.sh", "one node runs any command"


def test_the_nccl_efa_check_switch_is_a_spec_key_and_a_flag_that_reach_the_launch_request():
    loaded = run_spec.parse("resources:\n  nodes: 2\n  nccl_efa_check: false\ncommand: python t.py\n")
    assert loaded.resources.nccl_efa_check is False
    assert spec_cli.request_from_spec(loaded, launching.LaunchRequest()).nccl_efa_check is False
    flags = launching.LaunchRequest(nodes=2, nccl_efa_check=False)
    assert spec_cli.flags_as_spec(flags)["resources"]["nccl_efa_check"] is False
    with pytest.raises(run_spec.SpecError) as caught:
        run_spec.parse("resources:\n  nccl_efa_check: 'no'\n", source="run.yaml")
    assert caught.value.lines == ["run.yaml:2: resources.nccl_efa_check: got 'no'; allowed: true or false"]


@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("PET_NNODES=1 torchrun --nproc-per-node 8 train.py", "PET_NNODES"),
        ("env PET_STANDALONE=1 torchrun train.py", "PET_STANDALONE"),
        ("sh -c 'export PET_RDZV_ENDPOINT=localhost:29500; torchrun train.py'", "PET_RDZV_ENDPOINT"),
        ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0 python train.py", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"),
    ],
)
def test_a_gang_command_that_sets_the_gangs_rendezvous_variables_is_refused_naming_the_variable(command, name):
    """torchrun reads PET_<OPTION> as its options: PET_NNODES=1 is --nnodes=1 (node 0 trains alone)."""
    with pytest.raises(UsageError) as caught:
        launching.validate(launching.LaunchRequest(nodes="2", command=command))
    assert f"(here: {name} set in the command: the agent sets it for the gang" in str(caught.value)
    assert launching.validate(launching.LaunchRequest(command=command)).command == command, "one node: any"


def test_env_and_secrets_that_set_the_gangs_rendezvous_variables_are_refused_with_nodes_in_flags_and_specs():
    with pytest.raises(UsageError) as caught:
        launching.validate(launching.LaunchRequest(nodes="2", command="python t.py", env=["PET_NNODES=1"]))
    assert str(caught.value).startswith("option '--env': PET_NNODES set by the run: the agent sets it for the gang")
    refs = ["PET_MASTER_ADDR=ssm:/training-infra/x"]
    with pytest.raises(UsageError, match=r"^option '--secret': PET_MASTER_ADDR set by the run"):
        launching.validate(launching.LaunchRequest(nodes="2", command="python t.py", secret_refs=refs))
    assert launching.validate(launching.LaunchRequest(command="python t.py", env=["PET_NNODES=1"])).env, "one node"
    with pytest.raises(run_spec.SpecError) as spec_caught:
        run_spec.parse("resources:\n  nodes: 2\nenv:\n  PET_NNODES: '1'\n", source="run.yaml")
    [line] = spec_caught.value.lines
    assert line.startswith("run.yaml:3: env: got") and "PET_NNODES set by the run" in line
