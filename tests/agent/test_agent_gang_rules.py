"""The multi-node rules of ti_agent/gang.py, without a box: tags, the launch decision, NCCL's log,
completeness of a step, the trainer's whole process tree."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from training_infra.compute.agent.ti_agent import gang, settings
from training_infra.compute.agent.ti_agent.gang import GangError, Launch, Member, NcclNet

MEMBER = Member(nodes=4, node=2, rendezvous="10.0.1.17:29400", run_id="bert", attempt=3)
BOX = {"TI_DATA_BUCKET": "d", "TI_OUTPUTS_BUCKET": "o", "TI_IMAGE_URI": "i"}


def tags(**values: str) -> dict[str, str]:
    return {f"training-infra:{k}": v for k, v in values.items()}


def test_a_run_without_the_nodes_tag_is_a_single_node_run():
    assert gang.gang_size({}) == 1 and gang.gang_size(tags(nodes="4")) == 4


def test_the_member_is_known_only_once_both_node_and_rendezvous_are_tagged():
    assert gang.member_from_tags(tags(nodes="4", node="2"), run_id="bert", attempt=3) is None
    member = gang.member_from_tags(tags(nodes="4", node="2", rendezvous="10.0.1.17:29400"), run_id="bert", attempt=3)
    assert member == MEMBER and member.rdzv_id == "bert-3" and not member.is_host


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (tags(nodes="two"), "training-infra:nodes='two' is not allowed"),
        (tags(nodes="2", node="2", rendezvous="10.0.0.1:1"), "node='2' is not allowed: use a whole number from 0 to 1"),
        (tags(nodes="2", node="1", rendezvous="10.0.0.1"), "rendezvous='10.0.0.1' is not allowed: use HOST:PORT"),
        (tags(nodes="2", node="1", rendezvous="10.0.0.1:99999"), "rendezvous='10.0.0.1:99999' is not allowed"),
    ],
)  # fmt: skip
def test_a_wrong_gang_tag_fails_the_attempt_in_one_line_naming_it(bad, says):
    with pytest.raises(GangError, match=says.replace("(", r"\(").replace(")", r"\)")) as raised:
        gang.member_from_tags(bad, run_id="r", attempt=1)
    assert "\n" not in str(raised.value)


def test_the_wait_for_the_supervisors_tags_is_bounded_and_says_which_setting_bounds_it():
    now = [0.0]
    looks = []

    def read():
        looks.append(now[0])
        return tags(nodes="2")

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(GangError, match=r"not set within 10s \(TI_RENDEZVOUS_WAIT_SECONDS\)"):
        gang.wait_for_member(read, run_id="r", attempt=1, wait_seconds=10, clock=lambda: now[0], sleep=sleep)
    assert looks == [0, 2, 4, 6, 8, 10], "every 2 s, up to the limit"


def test_the_wait_ends_as_soon_as_the_tags_appear():
    answers = iter([tags(nodes="2"), tags(nodes="2"), tags(nodes="2", node="0", rendezvous="10.0.0.5:29400")])
    member = gang.wait_for_member(lambda: next(answers), run_id="r", attempt=2, wait_seconds=600, sleep=lambda _: None)
    assert member.is_host and member.rdzv_id == "r-2"


def test_the_trainer_env_names_the_gang_for_the_trainer_and_for_torchrun():
    env = gang.trainer_env(MEMBER, 8, nccl_debug=True)
    assert env["TI_NODES"] == "4" and env["TI_NODE_RANK"] == "2" and env["TI_RDZV_ID"] == "bert-3"
    assert env["PET_NNODES"] == "4" and env["PET_NPROC_PER_NODE"] == "8" and env["PET_RDZV_BACKEND"] == "c10d"
    assert env["PET_RDZV_ENDPOINT"] == env["TI_RDZV_ENDPOINT"] == "10.0.1.17:29400"
    assert env["PET_RDZV_ID"] == "bert-3" and "is_host=false" in env["PET_RDZV_CONF"]
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1", "pytorch#135712: a replacement deadlocks without it"
    assert env["NCCL_DEBUG"] == "INFO", "the EFA check reads NCCL's init log"
    assert "NCCL_DEBUG" not in gang.trainer_env(MEMBER, 8, nccl_debug=False)


@pytest.mark.parametrize(
    ("replace_minutes", "pull_seconds", "join"),
    [(10, 1800, 600 + 1800 + 300), (1, 1800, 60 + 1800 + 300), (120, 1800, 7200 + 1800 + 300), (10, 60, 960)],
)
def test_the_survivors_rendezvous_outwaits_the_supervisors_replacement_bound_plus_boot_and_pull(
    replace_minutes, pull_seconds, join
):
    timeout = gang.join_timeout_seconds(replace_minutes * 60, pull_seconds)
    assert timeout == join and timeout > replace_minutes * 60 + pull_seconds, "never before the replacement can join"
    member = dataclasses.replace(MEMBER, join_timeout=timeout)
    assert gang.trainer_env(member, 8, nccl_debug=False)["PET_RDZV_CONF"] == f"is_host=false,join_timeout={join}"
    assert f"--rdzv-conf is_host=false,join_timeout={join} " in gang.launch_command("python t.py", member, 8)[0]


def test_the_agent_takes_the_replace_timeout_the_supervisor_rendered_and_refuses_zero():
    knobs = settings.parse({**BOX, "TI_GANG_REPLACE_SECONDS": "7200"}).knobs
    assert knobs.gang_replace_seconds == 7200 and settings.parse(BOX).knobs.gang_replace_seconds == 600
    with pytest.raises(settings.SettingError, match="TI_GANG_REPLACE_SECONDS=0 is not allowed"):
        settings.parse({**BOX, "TI_GANG_REPLACE_SECONDS": "0"})


TORCHRUN = (
    "exec python -m torch.distributed.run --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d"
    " --rdzv-endpoint 10.0.1.17:29400 --rdzv-id bert-3 --rdzv-conf is_host=false,join_timeout=2700 --max-restarts 100"
)


@pytest.mark.parametrize(
    ("command", "wrapped"),
    [
        ("python train.py --lr 3e-4", f"{TORCHRUN} train.py --lr 3e-4"),
        ("exec python3 -m mypkg.train --epochs 2", TORCHRUN.replace("exec python ", "exec python3 ")
         + " -m mypkg.train --epochs 2"),
        # Interpreter flags: torchrun runs the user's own interpreter line (--no-python), so the workers keep them.
        ("python -u train.py", f"{TORCHRUN} --no-python python -u train.py"),
        ("python -O -B -W ignore::DeprecationWarning -X dev train.py --x 1",
         f"{TORCHRUN} --no-python python -O -B -W ignore::DeprecationWarning -X dev train.py --x 1"),
        ("python -uB -Xfaulthandler -m pkg.train", f"{TORCHRUN} --no-python python -uB -Xfaulthandler -m pkg.train"),
        ("python -OO -mpkg.train", f"{TORCHRUN} --no-python python -OO -mpkg.train"),
        ("python --check-hash-based-pycs never t.py",
         f"{TORCHRUN} --no-python python --check-hash-based-pycs never t.py"),
        # Assignments go before exec (`exec A=1 python` would run a program named A=1).
        ("OMP_NUM_THREADS=4 python train.py", f"OMP_NUM_THREADS=4 {TORCHRUN} train.py"),
        ("exec A=1 B='x y' python -u t.py", f"A=1 B='x y' {TORCHRUN} --no-python python -u t.py"),
        # The user's text is kept as typed: quoted operators are words, $VAR and globs expand as they would have.
        ('python train.py --name "a;b|c" --out "$OUTPUT_DIR/m"',
         f'{TORCHRUN} train.py --name "a;b|c" --out "$OUTPUT_DIR/m"'),
        ("python train.py --files /data/*.csv", f"{TORCHRUN} train.py --files /data/*.csv"),
    ],
)  # fmt: skip
def test_a_python_command_is_wrapped_in_torchrun_with_its_flags_and_words_as_typed(command, wrapped):
    assert gang.launch_command(command, MEMBER, 8) == (wrapped, Launch.WRAPPED)


@pytest.mark.parametrize(
    "command",
    [
        "torchrun --nproc-per-node 4 train.py",
        "exec torchrun train.py",
        "/opt/conda/bin/torchrun train.py",
        "python -m torch.distributed.run train.py",
        "python -u -m torch.distributed.run train.py",
        "python -m torch.distributed.launch train.py",
        "sh -c 'pip install -e . && torchrun train.py'",
        "bash -c 'cd /app; exec python -m torch.distributed.run train.py'",
    ],
)
def test_a_users_own_torchrun_runs_unchanged_and_takes_the_rest_from_pet_variables(command):
    assert gang.launch_command(command, MEMBER, 8) == (command, Launch.USER_TORCHRUN)


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("bash run.sh", "'bash' is neither python nor torchrun"),
        ("deepspeed x.py", "'deepspeed' is neither python nor torchrun"),
        ("python train.py | tee log", "'|' outside quotes makes it more than one program"),
        ("python a.py; python b.py", "';' outside quotes"),
        ("python a.py && echo done", "'&' outside quotes"),
        ("python a.py > out.txt; rm x", "'>' outside quotes: only output redirections at the end"),
        ("python a.py --seed $(date +%s)", "'$(' outside quotes"),
        ('python a.py --seed "`date`"', "'`' outside quotes"),
        ("python -c 'import train'", "python -c runs no script"),
        ("python -i train.py", "python -i waits for a terminal"),
        ("python - < train.py", "'<' outside quotes"),
        ("python -", "python option '-' cannot be wrapped"),
        ("python -u", "python is given no SCRIPT or -m MODULE"),
        ("python -W", "python option -W needs a value"),
        ("python -Z train.py", "python option -Z is not one python documents"),
        ("python --version", "python option '--version' cannot be wrapped"),
        ("A=1", "the command runs no program"),
        ("", "the command is empty"),
        ("python 'unclosed", "does not parse as shell words"),
    ],
)
def test_a_command_that_cannot_be_wrapped_fails_the_attempt_in_one_line_instead_of_running_n_trainers(command, why):
    with pytest.raises(GangError) as raised:
        gang.launch_command(command, MEMBER, 8)
    message = str(raised.value)
    assert message.startswith("TI_TRAINING_COMMAND cannot run on 4 nodes: ") and why in message
    assert "allowed: python [python's flags] SCRIPT|-m MODULE" in message and "\n" not in message


def test_a_wrapped_command_runs_in_a_real_shell_as_torchrun_with_the_users_words(tmp_path):
    """The wrapped text through bash, with `python` a stub that prints its argv: the words torchrun would get."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done; printf "A=%s\\n" "$A"\n')
    stub.chmod(0o755)
    wrapped, _ = gang.launch_command("A='x y' python -u train.py --name 'a;b' --out \"$OUT/m\"", MEMBER, 8)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "OUT": "/tmp/o"}
    ran = subprocess.run(["bash", "-c", wrapped], capture_output=True, text=True, env=env, check=True)
    argv = ran.stdout.splitlines()
    assert argv[:3] == ["-m", "torch.distributed.run", "--nnodes"]
    assert argv[argv.index("--no-python") + 1 :] == ["python", "-u", "train.py", "--name", "a;b", "--out", "/tmp/o/m",
                                                      "A=x y"]  # fmt: skip


# Real NCCL_DEBUG=INFO lines: aws-ofi-nccl on p5en (NVIDIA/nccl#1597), NCCL's socket transport
# (NVIDIA/nccl#1053, Oneflow-Inc/oneflow#3586), OFI without an optimal provider (aws-ofi-nccl#67).
EFA_LOG = """\
8h200-2:6831:6840 [0] NCCL INFO NET/OFI Support for DMA-BUF registrations: false
8h200-2:6831:6840 [0] NCCL INFO PROFILER/Plugin: Could not find: libnccl-profiler.so.
8h200-2:6831:6840 [0] NCCL INFO Using network Libfabric
8h200-3:6310:6318 [0] NCCL INFO NET/OFI Selected Provider is efa (found 16 nics)
8h200-3:6310:6318 [0] NCCL INFO NET/OFI NIC group 0 device #0 0000:56:00.0
"""
SOCKET_LOG = """\
worker:101542:101542 [0] NCCL INFO NET/Plugin : No plugin found (libnccl-net.so), using internal implementation
worker:101542:101542 [0] NCCL INFO NET/IB : No device found.
worker:101542:101542 [0] NCCL INFO NET/Socket : Using [0]eno1:172.18.40.41<0>
worker:101542:101542 [0] NCCL INFO Using network Socket
worker:101542:101934 [0] NCCL INFO Channel 00 : 0[18000] -> 1[18000] [receive] via NET/Socket/1
"""
TCP_PROVIDER_LOG = "ip-10-0-0-1:79:79 [0] NCCL INFO NET/OFI Selected Provider is tcp (found 1 nics)\n"


# aws-ofi-nccl v1.14.0 and later (src/nccl_ofi_net.cpp: "Selected provider is %s, fabric is %s (found %d nics)").
EFA_LOG_CURRENT = """\
ip-10-1-2-3:4121:4198 [0] NCCL INFO NET/Plugin: Loaded net plugin Libfabric (v9)
ip-10-1-2-3:4121:4198 [0] NCCL INFO NET/OFI Initializing aws-ofi-nccl 1.16.0
ip-10-1-2-3:4121:4198 [0] NCCL INFO NET/OFI Selected provider is efa, fabric is efa-direct (found 32 nics)
ip-10-1-2-3:4121:4198 [0] NCCL INFO Using network Libfabric
"""
TCP_PROVIDER_CURRENT = (
    "ip-10-0-0-1:79:79 [0] NCCL INFO NET/OFI Selected provider is tcp, fabric is 10.0.0.0/16 (found 1 nics)\n"
)


@pytest.mark.parametrize(
    ("log", "said"),
    [
        (EFA_LOG, "NET/OFI Selected Provider is efa (found 16 nics)"),  # aws-ofi-nccl up to v1.13
        (EFA_LOG_CURRENT, "NET/OFI Selected provider is efa, fabric is efa-direct (found 32 nics)"),  # v1.14 on
        ("h:1:1 [0] NCCL INFO NET/OFI Selected provider is efa, fabric is efa (found 4 nics)\n", "fabric is efa ("),
    ],
)
def test_nccl_over_efa_is_told_from_its_init_log_in_every_aws_ofi_nccl_wording(log, said):
    net, line = gang.nccl_network(log.splitlines())
    assert net is NcclNet.EFA and said in line


def test_nccl_falling_back_to_tcp_sockets_is_told_from_its_init_log():
    net, line = gang.nccl_network(SOCKET_LOG.splitlines())
    assert net is NcclNet.SOCKET and line.endswith("Using network Socket")


def test_one_rank_on_sockets_after_another_on_efa_is_a_socket_run():
    assert gang.nccl_network((EFA_LOG + SOCKET_LOG).splitlines())[0] is NcclNet.SOCKET


def test_libfabric_with_another_provider_is_not_efa_and_no_nccl_line_is_unknown():
    assert gang.nccl_network([TCP_PROVIDER_LOG])[0] is NcclNet.OTHER
    assert gang.nccl_network([TCP_PROVIDER_CURRENT])[0] is NcclNet.OTHER
    assert (
        gang.nccl_network(["h:1:1 [0] NCCL INFO NET/OFI Selected provider is efafoo, fabric is x\n"])[0]
        is NcclNet.OTHER
    )
    assert gang.nccl_network(["[trainer rank 0] step 1/10 loss 0.5"]) == (NcclNet.UNKNOWN, "")


def test_the_nccl_check_reads_the_log_as_it_grows_including_a_line_cut_mid_write(tmp_path):
    log = tmp_path / "training.log"
    log.write_text("starting\n8h200-3:6310:6318 [0] NCCL INFO NET/OFI Selected Prov")
    check = gang.NcclCheck(log)
    assert check.look()[0] is NcclNet.UNKNOWN
    with open(log, "a") as out:
        out.write("ider is efa (found 16 nics)\n")
    assert check.look()[0] is NcclNet.EFA


def test_efa_devices_are_the_uverbs_devices(tmp_path):
    assert gang.efa_devices(str(tmp_path)) == []
    (tmp_path / "dev/infiniband").mkdir(parents=True)
    for name in ("uverbs0", "uverbs1", "rdma_cm"):
        (tmp_path / "dev/infiniband" / name).touch()
    assert gang.efa_devices(str(tmp_path)) == [
        f"{tmp_path}/dev/infiniband/uverbs0",
        f"{tmp_path}/dev/infiniband/uverbs1",
    ]


def test_a_step_is_complete_only_with_metadata_and_every_nodes_marker():
    files = [
        "step-000003/.metadata", "step-000003/__0_0.distcp", "step-000003/.node-0.done", "step-000003/.node-1.done",
        "step-000006/.metadata", "step-000006/.node-0.done",  # node 1's shards not up yet
        "step-000009/__1_0.distcp", "step-000009/.node-0.done", "step-000009/.node-1.done",  # no .metadata
        "_manifest.node-0.json", "step-000012.tmp/.metadata",
    ]  # fmt: skip
    assert gang.complete_steps(files, 2) == ["step-000003"]
    assert gang.complete_steps(files, 1) == ["step-000003", "step-000006"]


def test_the_trainers_processes_are_found_by_their_token_even_in_their_own_sessions():
    token = os.urandom(8).hex()
    env = {**os.environ, gang.TRAINER_TOKEN: token}
    # A worker as torchrun starts it: a new session, so killpg of the trainer's group never reaches it.
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while worker.pid not in gang.tagged_pids(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gang.tagged_pids(token) == [worker.pid]
        assert gang.kill_tree(token, signal.SIGKILL) == 1
        assert worker.wait(timeout=10) == -signal.SIGKILL and other.poll() is None
    finally:
        for process in (worker, other):
            process.kill()
            process.wait()


STRAY_WORKER = """
import subprocess, sys, time
# As torchrun does: a worker in its own session, which the trainer's process group does not reach.
code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('worker up', flush=True); "
code += "time.sleep(300)"
subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
time.sleep(300)
"""


def test_stopping_the_trainer_kills_workers_that_started_their_own_sessions(tmp_path):
    from training_infra.compute.agent.ti_agent.runtime import ProcessTrainer, TrainerSpec

    script = tmp_path / "launcher.py"
    script.write_text(STRAY_WORKER)
    spec = TrainerSpec(
        command=f"exec {sys.executable} {script}", image="", run_id="r", region="", data_dir=tmp_path,
        out_dir=tmp_path, ckpt_dir=tmp_path, progress_dir=tmp_path, heartbeat_host=tmp_path / "beat",
        heartbeat_file="", stop_grace_seconds=1, trainer_env=tmp_path / "none.env",
        secrets_env=tmp_path / "secrets.env", aws_dir=None, train_log=tmp_path / "training.log",
    )  # fmt: skip
    notes: list[str] = []
    trainer = ProcessTrainer(spec, notes.append, notes.append)
    trainer.start(dict(os.environ))
    deadline = time.monotonic() + 30
    while "worker up" not in spec.train_log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [worker] = [pid for pid in gang.tagged_pids(trainer.token) if pid != trainer.pid]
    assert os.getsid(worker) != os.getsid(trainer.pid), "the worker is in a session of its own"
    trainer.stop(1)
    assert not trainer.alive(), "nothing of the trainer's tree is left"
    assert any("outside its process group" in note for note in notes), notes
    trainer.wait()


class _SyncCounting:
    def __init__(self) -> None:
        self.syncs = 0

    def sync(self) -> bool:
        self.syncs += 1
        return True


def test_a_gang_member_syncs_its_steps_every_few_seconds_whatever_the_periodic_sync(monkeypatch):
    import threading
    from types import SimpleNamespace

    monkeypatch.setattr(gang.StepSyncWatcher, "every", 0.05)
    checkpoints = _SyncCounting()
    agent = SimpleNamespace(
        member=MEMBER, checkpoints=checkpoints, halt=threading.Event(), root="/nonexistent",
        knobs=SimpleNamespace(nccl_efa_check=True), config=SimpleNamespace(checkpoint_sync_seconds=300),
        log=lambda line: None, note=lambda line: None,
    )  # fmt: skip
    gang.start_watchers(agent)
    deadline = time.monotonic() + 5
    while checkpoints.syncs < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    agent.halt.set()
    assert checkpoints.syncs >= 3
    assert gang.STEP_SYNC_SECONDS <= 5, "a replacement restores what S3 holds within seconds of the save"


def test_a_single_node_run_starts_no_gang_watcher():
    import threading
    from types import SimpleNamespace

    before = threading.active_count()
    gang.start_watchers(SimpleNamespace(member=None))
    assert threading.active_count() == before


def test_real_torchrun_starts_every_worker_with_the_users_interpreter_flags(tmp_path):
    """One node, two workers, real torch.distributed.run: `python -O -B SCRIPT` wrapped keeps -O and -B in the
    workers (torchrun's own `python -u SCRIPT` would drop them)."""
    (tmp_path / "t.py").write_text(
        # One write per line: print() writes its pieces apart, and the two workers share the pipe.
        "import os, sys\nflags = sys.flags.optimize, sys.flags.dont_write_bytecode\n"
        "os.write(1, f\"worker {os.environ['RANK']} {flags[0]} {flags[1]}\\n\".encode())\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    member = Member(nodes=1, node=0, rendezvous=f"127.0.0.1:{port}", run_id="flags", attempt=1, join_timeout=60)
    wrapped, how = gang.launch_command("python -O -B t.py", member, 2)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    ran = subprocess.run(["bash", "-c", wrapped], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert how is Launch.WRAPPED and ran.returncode == 0, ran.stderr[-2000:]
    assert sorted(line for line in ran.stdout.splitlines() if line.startswith("worker")) == [
        "worker 0 1 1", "worker 1 1 1"]  # fmt: skip


def _joining_agent(command: str, tmp_path, **knobs):
    """What `gang.join` reads of the agent: IMDS's instance tags (the supervisor's, already set), knobs, config."""
    from types import SimpleNamespace

    tags = {"training-infra:nodes": "2", "training-infra:node": "1", "training-infra:rendezvous": "10.0.0.5:29400"}

    def imds_get(path: str) -> str:
        return "\n".join(tags) if path == "meta-data/tags/instance" else tags[path.rsplit("/", 1)[1]]

    defaults = settings.Knobs()
    return SimpleNamespace(
        imds=SimpleNamespace(get=imds_get), log=lambda _: None, note=lambda _: None, run_id="bert", attempt=2,
        knobs=dataclasses.replace(defaults, **knobs), config=SimpleNamespace(training_command=command),
        aws=None, ckpt_dir=tmp_path, state=tmp_path, outputs_bucket="o", member=None, checkpoints=None,
    )  # fmt: skip


def test_join_gives_the_member_the_join_timeout_derived_from_the_runs_replace_timeout(tmp_path):
    agent = _joining_agent("python train.py", tmp_path, gang_replace_seconds=7200, pull_timeout_seconds=1800)
    gang.join(agent)
    assert agent.member.join_timeout == 7200 + 1800 + 300 and agent.member.node == 1
    assert isinstance(agent.checkpoints, gang.GangCheckpoints)


def test_join_refuses_a_command_it_cannot_wrap_before_the_image_pull_and_the_restore(tmp_path):
    agent = _joining_agent("bash run.sh", tmp_path)
    with pytest.raises(GangError, match=r"^TI_TRAINING_COMMAND cannot run on 2 nodes: 'bash' is neither"):
        gang.join(agent)
    assert agent.checkpoints is None, "no gang checkpoints made, nothing restored"
