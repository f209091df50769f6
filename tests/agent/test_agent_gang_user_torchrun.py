"""A user's own torchrun on a gang (issue 25, second review): the options the gang sets (PET_*) are refused, at
launch and on the box, in one line; a shell script counts as the user's torchrun only when torchrun is the program
of one of its commands. The last test runs real torch over two local "nodes"."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from training_infra import launch_rules
from training_infra.compute.agent.ti_agent import gang, torchrun
from training_infra.compute.agent.ti_agent.gang import GangError, Launch, Member
from training_infra.launch_rules import Refused

MEMBER = Member(nodes=2, node=1, rendezvous="10.0.1.17:29400", run_id="bert", attempt=3)

CONTRADICTING = [
    # (command, what the one line names)
    ("torchrun --standalone --nproc-per-node 8 train.py", "torchrun --standalone contradicts the gang"),
    ("torchrun --nnodes=1 --nproc_per_node=8 train.py", "torchrun --nnodes=1 contradicts the gang: a gang of 2"),
    ("torchrun --nnodes 4 --nproc-per-node 8 train.py", "torchrun --nnodes=4 contradicts"),
    ("torchrun --nnodes 1:2 train.py", "--nnodes=1:2 contradicts"),  # elastic: would go on without the replacement
    ("torchrun --nnode 1 train.py", "--nnodes=1 contradicts"),  # argparse takes a unique prefix
    ("python -m torch.distributed.run --standalone --nproc-per-node 2 train.py", "--standalone contradicts"),
    ("python -u -m torch.distributed.launch --master_port=1234 train.py", "--master-port=1234 contradicts"),
    ("torchrun --rdzv-endpoint localhost:29500 --nnodes 2 train.py", "--rdzv-endpoint=localhost:29500 contradicts"),
    ("torchrun --rdzv_id mine train.py", "--rdzv-id=mine contradicts"),
    ("torchrun --rdzv-backend=static train.py", "--rdzv-backend=static contradicts"),
    ("torchrun --master-addr 10.0.0.1 train.py", "--master-addr=10.0.0.1 contradicts"),
    ("OMP_NUM_THREADS=1 exec torchrun --node-rank 0 train.py", "--node-rank=0 contradicts"),
    ("sh -c 'pip install -e . && torchrun --standalone train.py'", "--standalone contradicts"),
    ("torchrun --bogus train.py", "torchrun option '--bogus' is not one torchrun has"),
    ("torchrun --master x train.py", "'--master' is not one torchrun has (or names more than one)"),
]


@pytest.mark.parametrize(("command", "says"), CONTRADICTING)
def test_a_users_torchrun_whose_options_contradict_the_gang_fails_the_attempt_in_one_line(command, says):
    with pytest.raises(GangError) as raised:
        gang.launch_command(command, MEMBER, 8)
    message = str(raised.value)
    assert says in message and "\n" not in message
    if "contradicts" in message:
        assert "leave it out (the agent sets PET_*)" in message


@pytest.mark.parametrize(("command", "says"), CONTRADICTING)
def test_a_users_torchrun_whose_options_contradict_the_gang_is_refused_at_launch(command, says):
    with pytest.raises(Refused, match="with 2 nodes, ") as raised:
        launch_rules.gang_command(command, 2)
    assert says in str(raised.value)
    assert launch_rules.gang_command(command, 1) == command  # a single-node run's command is its own


@pytest.mark.parametrize(
    "command",
    [
        "sh -c 'python train.py --launcher torchrun'",
        "bash -c 'command -v torchrun && python train.py'",
        "sh -c 'echo torchrun; python -m torch.distributed.runner x.py'",
    ],
)
def test_a_shell_script_that_only_mentions_torchrun_is_refused_not_taken_for_the_users_torchrun(command):
    with pytest.raises(GangError, match=r"-c runs torchrun as none of its commands' program"):
        gang.launch_command(command, MEMBER, 8)
    with pytest.raises(Refused):
        launch_rules.gang_command(command, 2)


@pytest.mark.parametrize(
    "command",
    [
        "torchrun --nproc-per-node 8 train.py --nnodes 1 --standalone",  # after the script: the script's own words
        "torchrun --nnodes 2 train.py",
        "torchrun --nnodes=2:2 --max-restarts 3 -m pkg.train",
        "torchrun -r 3 -t3 --rdzv-conf read_timeout=120 --log-dir /tmp/l train.py",
        "python -m torch.distributed.launch --use-env train.py",
        "sh -c 'pip install -e . && torchrun --nproc-per-node 4 train.py'",
        "bash -c 'if true; then exec python -m torch.distributed.run train.py; fi'",
    ],
)
def test_a_users_torchrun_that_leaves_the_gang_options_to_the_agent_runs_unchanged(command):
    assert gang.launch_command(command, MEMBER, 8) == (command, Launch.USER_TORCHRUN)
    assert launch_rules.gang_command(command, 2) == command


def test_the_stdlib_table_of_torchruns_options_is_torch_2_13s_own_parser():
    """The agent's box may have no torch: its table must say what torch's parser says (options, which take a value),
    and every option the gang refuses is one torch has."""
    from torch.distributed.run import get_args_parser

    real = {o: a.nargs != 0 for a in get_args_parser()._actions for o in a.option_strings}
    assert real == torchrun.TORCHRUN_OPTIONS
    assert set(real) >= torchrun.GANG_OPTIONS


def test_the_agent_reads_torchruns_options_from_torch_where_it_can_and_launch_never_imports_torch():
    from torch.distributed.run import get_args_parser

    real = {o: a.nargs != 0 for a in get_args_parser()._actions for o in a.option_strings}
    assert torchrun.torchrun_options(from_torch=True) == real
    code = (
        "import sys\nfrom training_infra import launch_rules\n"
        "launch_rules.gang_command('torchrun --nproc-per-node 2 t.py', 2)\n"
        "print('torch' in sys.modules)\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert ran.stdout.strip() == "False", "the CLI's launch check must not import torch (seconds per launch)"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_real_torch_a_users_torchrun_without_gang_options_trains_as_one_job_over_both_nodes(tmp_path):
    """Two local "nodes", each the user's `torchrun --nproc-per-node 1 w.py` (accepted) with the agent's PET_*
    (gang.trainer_env): both workers see world_size 2. The refused `--nnodes=1` form gives node 0 world_size 1."""
    (tmp_path / "w.py").write_text(
        "import torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "print('world_size', dist.get_world_size(), flush=True)\n"
        "dist.destroy_process_group()\n"
    )
    endpoint = f"127.0.0.1:{_free_port()}"
    bindir = os.path.dirname(sys.executable)

    def run(command: str) -> list[str]:
        procs = []
        for node in (0, 1):
            member = Member(nodes=2, node=node, rendezvous=endpoint, run_id="r", attempt=1, join_timeout=30)
            launched, how = gang.launch_command(command, member, 1)
            assert how is Launch.USER_TORCHRUN
            env = {
                **os.environ,
                **gang.trainer_env(member, 1, nccl_debug=False),
                "PATH": f"{bindir}:{os.environ['PATH']}",
            }
            procs.append(subprocess.Popen(["bash", "-c", launched], cwd=tmp_path, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
        return [p.communicate(timeout=120)[0] for p in procs]

    outs = run("torchrun --nproc-per-node 1 w.py")
    assert all("world_size 2" in out for out in outs), outs
    refused = "torchrun --nnodes=1 --nproc-per-node 1 w.py"
    with pytest.raises(GangError, match="--nnodes=1 contradicts"):
        gang.launch_command(refused, MEMBER, 1)
    # Why: run as given on node 0 with the same PET_*, the command's own --nnodes wins and node 0 trains alone.
    host = Member(nodes=2, node=0, rendezvous=f"127.0.0.1:{_free_port()}", run_id="r", attempt=2, join_timeout=30)
    env = {**os.environ, **gang.trainer_env(host, 1, nccl_debug=False), "PATH": f"{bindir}:{os.environ['PATH']}"}
    alone = subprocess.run(["bash", "-c", refused], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "world_size 1" in alone.stdout, alone.stdout + alone.stderr[-2000:]


TORCHRUN = (
    "exec python -m torch.distributed.run --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d"
    " --rdzv-endpoint 10.0.1.17:29400 --rdzv-id bert-3 --rdzv-conf is_host=false,join_timeout=2700 --max-restarts 100"
)


@pytest.mark.parametrize(
    ("command", "wrapped"),
    [
        # The trainer's output redirected at the end: kept after torchrun, whose workers inherit its stdout/stderr.
        ("python train.py 2>&1", f"{TORCHRUN} train.py 2>&1"),
        ("python train.py > /outputs/log.txt 2>&1", f"{TORCHRUN} train.py > /outputs/log.txt 2>&1"),
        ("python -u t.py &>> \"$OUTPUT_DIR/log\"", f"{TORCHRUN} --no-python python -u t.py &>> \"$OUTPUT_DIR/log\""),
        # env NAME=value runs torchrun (its workers inherit the variables), as it ran the trainer.
        ("env A=1 B='x y' python train.py", f"exec env A=1 B='x y' {TORCHRUN.removeprefix('exec ')} train.py"),
        ("/usr/bin/env python -u t.py",
         f"exec /usr/bin/env {TORCHRUN.removeprefix('exec ')} --no-python python -u t.py"),
        ("A=2 env B=1 python3 -m pkg.train 2>err",
         f"A=2 exec env B=1 {TORCHRUN.removeprefix('exec ').replace('python ', 'python3 ', 1)} -m pkg.train 2>err"),
    ],
)  # fmt: skip
def test_env_assignments_and_trailing_output_redirections_are_wrapped_with_the_same_meaning(command, wrapped):
    assert gang.launch_command(command, MEMBER, 8) == (wrapped, Launch.WRAPPED)


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("python t.py < input.txt", "'<' outside quotes: only output redirections at the end"),
        ("python t.py > log; rm x", "only output redirections at the end"),
        ("python t.py > $(date).log", "only output redirections at the end"),
        ("python t.py 2>&1 | tee log", "only output redirections at the end"),
        ("env -i python t.py", "env option '-i' cannot be wrapped"),
        ("cd /app && python t.py", "'&' outside quotes makes it more than one program"),
        ("accelerate launch t.py", "'accelerate' is neither python nor torchrun"),
        ("uv run t.py", "'uv' is neither python nor torchrun"),
        ("env A=1 torchrun --standalone t.py", "torchrun --standalone contradicts the gang"),
        ("sh -c 'torchrun 2>&1 --standalone t.py'", "torchrun --standalone contradicts the gang"),
        ("sh -c 'torchrun > log --nnodes 1 t.py'", "torchrun --nnodes=1 contradicts the gang"),
    ],
)
def test_what_stays_refused_around_env_and_redirections_is_one_line(command, why):
    with pytest.raises(GangError, match="^TI_TRAINING_COMMAND cannot run on 2 nodes: ") as raised:
        gang.launch_command(command, MEMBER, 8)
    assert why in str(raised.value)


def test_a_wrapped_command_with_env_and_redirections_runs_in_a_real_shell_as_torchrun(tmp_path):
    """Through bash, `python` a stub printing its argv and A on stdout and a line on stderr: both land in the file."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done; printf "A=%s\\n" "$A"; echo err >&2\n')
    stub.chmod(0o755)
    wrapped, _ = gang.launch_command("env A='x y' python train.py --lr 1 > out.txt 2>&1", MEMBER, 8)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    ran = subprocess.run(["bash", "-c", wrapped], capture_output=True, text=True, env=env, check=True, cwd=tmp_path)
    assert ran.stdout == "" and ran.stderr == ""
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert lines[:3] == ["-m", "torch.distributed.run", "--nnodes"]
    assert lines[-5:] == ["train.py", "--lr", "1", "A=x y", "err"]
