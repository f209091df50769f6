"""A gang's container on the host network: kept from IMDS while the agent keeps it, EFA's environment
only where it fits (ti_agent/imds_block.py, gang.launch and gang.efa_env; issue 25).

The rules without a box first; then, as root with podman and iptables, the real thing: the container
`gang.launch()` and `DockerTrainer` build for a gang member cannot open a connection to the IMDS the
agent uses (a fake IMDSv2 holding instance-role credentials on a loopback address, as the sandbox's
instances have), while the agent's process reads them, and the trainer still gets its trainer-role
session through the read-only mount.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from training_infra.compute.agent.ti_agent import gang, imds_block
from training_infra.compute.agent.ti_agent.gang import GangError, Member
from training_infra.compute.agent.ti_agent.imds import Imds
from training_infra.compute.agent.ti_agent.imds_block import (
    BlockError,
    CgroupDriver,
    ImdsBlock,
    Target,
    TrainerCgroup,
    cgroup2_root,
    targets,
)
from training_infra.compute.agent.ti_agent.runtime import DockerTrainer, TrainerSpec
from training_infra.compute.agent.ti_agent.secrets import trainer_aws_config
from training_infra.local.containers import LOCAL_IMAGE, free_loopback_address
from training_infra.local.imds import FakeImds

MEMBER = Member(nodes=2, node=1, rendezvous="10.0.0.10:29400", run_id="gnet", attempt=1)
ROLE = "training-infra-instance"
INSTANCE_KEYS = {"AccessKeyId": "ASIAINSTANCEROLE", "SecretAccessKey": "instance-secret", "Token": "instance-token"}


# ---------------------------------------------------------------- the rules, no box needed
def test_both_imds_addresses_are_blocked_whole_and_a_local_endpoint_at_its_port_only():
    aws = targets("http://169.254.169.254")
    assert aws == [Target("169.254.169.254"), Target("fd00:ec2::254")], "on AWS: IMDS v4 and v6, every port"
    local = targets("http://127.31.4.7:8123")
    assert local[-1] == Target("127.31.4.7", 8123), "the sandbox's fake IMDS: its port, not node 0's c10d store"
    assert targets("http://[fd00:ec2::254]/") == aws, "the IPv6 endpoint is IMDS itself: nothing more to add"


def test_an_imds_endpoint_that_is_not_an_ip_address_fails_in_one_line_naming_it():
    with pytest.raises(BlockError, match=r"IMDS endpoint 'http://imds\.internal' is not http://<IP address>"):
        targets("http://imds.internal")


def test_each_rule_rejects_its_address_from_the_trainer_cgroup_only():
    path = TrainerCgroup(CgroupDriver.CGROUPFS).path
    assert Target("169.254.169.254").rule(path) == [
        "TI-TRAINER-IMDS", "-d", "169.254.169.254", "-m", "cgroup", "--path", "/training_infra_trainer",
        "-j", "REJECT",
    ]  # fmt: skip
    assert Target("127.0.0.9", 80).rule(path)[3:7] == ["-p", "tcp", "--dport", "80"]


def test_the_cgroup_parent_follows_the_engines_cgroup_driver():
    systemd, cgroupfs = TrainerCgroup(CgroupDriver.SYSTEMD), TrainerCgroup(CgroupDriver.CGROUPFS)
    assert systemd.engine_args()[:2] == ("--cgroup-parent", "training_infra_trainer.slice")
    assert systemd.path == "/training_infra_trainer.slice", "a slice without a dash sits at the root"
    assert cgroupfs.engine_args()[:2] == ("--cgroup-parent", "/training_infra_trainer")
    assert cgroupfs.engine_args()[2:] == ("--cap-drop", "NET_RAW"), "no packet socket past the rule"


def _answers(table: dict[str, tuple[int, str]]):
    calls: list[list[str]] = []

    def run(argv, **_):
        calls.append(argv)
        code, out = table.get(argv[-1], (1, ""))
        return subprocess.CompletedProcess(argv, code, out, "")

    return run, calls


def test_the_driver_is_dockers_cgroupdriver_else_podmans_cgroup_manager_else_one_line():
    run, _ = _answers({"{{.CgroupDriver}}": (0, "systemd\n")})
    assert ImdsBlock(endpoint="http://169.254.169.254", docker="docker", run=run).driver() is CgroupDriver.SYSTEMD
    run, calls = _answers({"{{.Host.CgroupManager}}": (0, "cgroupfs\n")})
    assert ImdsBlock(endpoint="http://169.254.169.254", docker="docker", run=run).driver() is CgroupDriver.CGROUPFS
    assert len(calls) == 2, "podman answers the second question"
    run, _ = _answers({})
    with pytest.raises(BlockError, match=r"^`docker info` names no cgroup driver \(systemd or cgroupfs\)"):
        ImdsBlock(endpoint="http://169.254.169.254", docker="docker", run=run).driver()


def test_the_cgroup2_hierarchy_is_found_on_unified_and_hybrid_boxes_and_its_absence_fails(tmp_path):
    unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n"
    hybrid = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    assert cgroup2_root(unified) == Path("/sys/fs/cgroup")
    assert cgroup2_root(hybrid) == Path("/sys/fs/cgroup/unified")
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    block = ImdsBlock(endpoint="http://169.254.169.254", docker="docker", mounts=mounts)
    with pytest.raises(BlockError, match="no cgroup v2 hierarchy is mounted"):
        block.root()


def test_with_systemd_the_slice_is_a_started_unit_made_once_and_the_probe_runs_in_it(tmp_path):
    """The AMI's case (Docker, systemd driver), which this machine (no systemd as init) cannot run."""
    root, units, calls = tmp_path / "cgroup", tmp_path / "units", []

    def run(argv, **_):
        calls.append(argv)
        if argv[:2] == ["systemctl", "start"]:
            (root / argv[2]).mkdir(parents=True, exist_ok=True)  # systemd realises a started slice's cgroup
        return subprocess.CompletedProcess(argv, 0, "ECONNREFUSED\n" if argv[0] == "systemd-run" else "", "")

    block = ImdsBlock(endpoint="http://169.254.169.254", docker="docker", run=run, units=units)
    cgroup = TrainerCgroup(CgroupDriver.SYSTEMD)
    for _ in range(2):
        assert block.make_parent(cgroup, root) == root / "training_infra_trainer.slice"
    assert [c for c in calls if c[0] == "systemctl"] == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "start", "training_infra_trainer.slice"],
        ["systemctl", "start", "training_infra_trainer.slice"],
    ], "the unit is written and loaded once, started every time (started, systemd never removes it)"
    assert (units / "training_infra_trainer.slice").read_text().startswith("[Unit]\n")
    assert block.probe(cgroup, root / "training_infra_trainer.slice") == "ECONNREFUSED"
    assert calls[-1][:6] == [
        "systemd-run",
        "--quiet",
        "--collect",
        "--scope",
        "--slice=training_infra_trainer.slice",
        "--",
    ]
    assert calls[-1][-3:] == ["169.254.169.254", "80", "3.0"], "the probe knocks on the agent's own endpoint"


def test_a_box_whose_iptables_refuses_the_cgroup_match_fails_the_block_in_one_line_naming_it(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {tmp_path / 'cgroup'} cgroup2 rw 0 0\n")
    (tmp_path / "cgroup").mkdir()

    def run(argv, **_):
        if argv[:2] == ["docker", "info"]:
            return subprocess.CompletedProcess(argv, 0, "cgroupfs\n", "")
        if argv[0] == "iptables" and "-A" in argv:
            return subprocess.CompletedProcess(argv, 2, "", "iptables v1.8.9 (nf_tables): Couldn't load match `cgroup'")
        return subprocess.CompletedProcess(argv, 0 if "-N" in argv else 1, "", "")

    block = ImdsBlock(endpoint="http://169.254.169.254", docker="docker", run=run, mounts=mounts)
    with pytest.raises(BlockError) as failed:
        block.install()
    line = str(failed.value)
    assert line.startswith("iptables refused the IMDS rule") and "Couldn't load match `cgroup'" in line, line
    assert "\n" not in line


def test_rdma_is_left_to_libfabric_on_every_efa_box_and_no_efa_variable_is_set_without_efa():
    on_efa = gang.efa_env(["/dev/infiniband/uverbs0"])
    assert "FI_EFA_USE_DEVICE_RDMA" not in on_efa, "=1 aborts libfabric on devices without RDMA read (g5, g6)"
    assert on_efa["FI_PROVIDER"] == "efa"
    assert gang.efa_env([]) == {}


def _agent(tmp_path: Path, *, runtime: str, docker: str = "docker", endpoint: str = "http://169.254.169.254"):
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "trainer.env").write_text("FI_EFA_USE_DEVICE_RDMA=1\n")  # the user's --env line
    (tmp_path / "dev" / "infiniband").mkdir(parents=True, exist_ok=True)
    (tmp_path / "dev" / "infiniband" / "uverbs0").touch()
    notes: list[str] = []
    return SimpleNamespace(
        member=MEMBER, root=str(tmp_path), state=state, log=notes.append, note=notes.append,
        settings=SimpleNamespace(runtime=SimpleNamespace(value=runtime)),
        knobs=SimpleNamespace(nvidia_smi="", nccl_efa_check=True, docker=docker),
        imds=SimpleNamespace(endpoint=endpoint), aws=SimpleNamespace(cli_env=lambda: dict(os.environ)),
    )  # fmt: skip


def test_a_gang_member_gets_host_network_memlock_its_efa_devices_and_no_forced_rdma(tmp_path):
    agent = _agent(tmp_path, runtime="process")
    _, engine = gang.launch(agent, "python train.py")
    assert engine == (
        "--network", "host", "--ulimit", "memlock=-1:-1", "--device", f"{tmp_path}/dev/infiniband/uverbs0",
    )  # fmt: skip
    env = dict(line.split("=", 1) for line in (agent.state / "trainer.env").read_text().splitlines())
    assert env["FI_PROVIDER"] == "efa" and env["NCCL_DEBUG"] == "INFO"
    assert env["FI_EFA_USE_DEVICE_RDMA"] == "1", "only the user's own line sets it"


def test_a_gang_container_whose_imds_block_cannot_be_made_does_not_start_and_changes_nothing(tmp_path):
    agent = _agent(tmp_path, runtime="docker", docker=str(tmp_path / "no-such-docker"))
    before = (agent.state / "trainer.env").read_text()
    with pytest.raises(BlockError, match=r"^`.*no-such-docker info` names no cgroup driver") as failed:
        gang.launch(agent, "python train.py")
    assert "\n" not in str(failed.value), "one line"
    assert (agent.state / "trainer.env").read_text() == before, "no gang variable written for a trainer never started"


# ---------------------------------------------------------------- for real: podman, iptables, a fake IMDS
def _real_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (iptables, cgroups)"
    missing = [tool for tool in ("iptables", "ip6tables") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not installed" if missing else None


@pytest.fixture(scope="module")
def imds_with_role():
    """A fake IMDSv2 on its own loopback address holding instance-role credentials, as a played instance's."""
    fake = FakeImds(host=free_loopback_address(), role=(ROLE, INSTANCE_KEYS)).start()
    yield fake
    fake.stop()


@pytest.fixture
def real_block(imds_with_role, container_engine):
    reason = _real_reason()
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the IMDS block cannot be tried: {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)
    block = ImdsBlock(endpoint=imds_with_role.url, docker=str(container_engine.docker), log=lambda _: None)
    yield block
    block.remove(block.driver())


IMDS_PROBE = (
    "printf 'PUT /latest/api/token HTTP/1.0\\r\\nX-aws-ec2-metadata-token-ttl-seconds: 60\\r\\n\\r\\n'"
    " | nc -w 3 {address} {port} > /outputs/imds.txt 2>&1; echo nc=$? >> /outputs/imds.txt;"
    " echo hello | nc -w 3 {address} {rdzv} > /outputs/rdzv.txt 2>&1;"
    " arping -c 1 -w 1 -I lo 127.0.0.1 > /outputs/packet.txt 2>&1;"
    " cat /run/training-infra/aws/session.json > /outputs/session.json; echo saved > /checkpoints/step.txt"
)


def playable(engine_args: tuple[str, ...]) -> tuple[str, ...]:
    """The gang's flags as this machine can run them: its root lacks CAP_SYS_RESOURCE, so `memlock=-1:-1`
    becomes the caller's hard limit; and podman drops containers.conf's ulimits once any --ulimit is
    given, so nofile and nproc come back at the caller's hard limits (as the engine's config sets them).
    On AWS root raises its limits: the production flags run there unchanged."""
    hard = {
        name: resource.getrlimit(getattr(resource, f"RLIMIT_{name.upper()}"))[1]
        for name in ("memlock", "nofile", "nproc")
    }
    limits = {name: "-1" if value == resource.RLIM_INFINITY else str(value) for name, value in hard.items()}
    limits["nproc"] = str(min(int(limits["nproc"]) if limits["nproc"] != "-1" else 32768, 32768))
    swapped = tuple(
        f"memlock={limits['memlock']}:{limits['memlock']}" if a == "memlock=-1:-1" else a for a in engine_args
    )
    return (*swapped, *(x for n in ("nofile", "nproc") for x in ("--ulimit", f"{n}={limits[n]}:{limits[n]}")))


@pytest.fixture(scope="module")
def rendezvous_store(imds_with_role):
    """A TCP listener on the IMDS's own address, another port: node 0's c10d store in the sandbox."""
    server = socket.create_server((imds_with_role.host, 0))
    server.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"store here\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def _run_gang_container(tmp_path: Path, engine, imds: FakeImds, engine_args: tuple[str, ...], rdzv: int) -> Path:
    """The trainer's container as the agent starts it for a gang member, with a probe as its command."""
    address, port = imds.url.removeprefix("http://").rsplit(":", 1)
    folders = {name: tmp_path / name for name in ("data", "outputs", "checkpoints", "progress", "aws")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    session = folders["aws"] / "session.json"
    fd = os.open(session, os.O_WRONLY | os.O_CREAT, 0o600)  # as secrets.assume_trainer_role writes it
    os.write(fd, json.dumps({"Version": 1, "AccessKeyId": "ASIATRAINERROLE"}).encode())
    os.close(fd)
    trainer_aws_config(folders["aws"], "/run/training-infra/aws")
    (tmp_path / "trainer.env").write_text("")
    (tmp_path / "secrets.env").write_text("")
    spec = TrainerSpec(
        command=IMDS_PROBE.format(address=address, port=port, rdzv=rdzv), image=LOCAL_IMAGE, run_id="gnet",
        region="us-east-1",
        data_dir=folders["data"], out_dir=folders["outputs"], ckpt_dir=folders["checkpoints"],
        progress_dir=folders["progress"], heartbeat_host=folders["progress"] / "beat.json",
        heartbeat_file="/run/training-infra/progress/beat.json", stop_grace_seconds=5,
        trainer_env=tmp_path / "trainer.env", secrets_env=tmp_path / "secrets.env", aws_dir=folders["aws"],
        train_log=tmp_path / "train.log", engine_args=engine_args,
    )  # fmt: skip
    spec = dataclasses.replace(spec, engine_args=playable(engine_args))
    trainer = DockerTrainer(spec, print, print, docker=str(engine.docker), has_secrets=False)
    trainer.start(dict(os.environ))
    assert trainer.wait() == 0, (tmp_path / "train.log").read_text()
    return folders["outputs"]


@pytest.mark.slow
def test_a_gang_container_cannot_reach_imds_while_the_agent_can_and_its_trainer_role_still_works(
    tmp_path, container_engine, imds_with_role, rendezvous_store, real_block
):
    agent = _agent(tmp_path, runtime="docker", docker=str(container_engine.docker), endpoint=imds_with_role.url)
    _, engine_args = gang.launch(agent, "python train.py")
    block_args = TrainerCgroup(real_block.driver()).engine_args()
    assert engine_args[-len(block_args) :] == block_args
    engine_args = tuple(a for a in engine_args if "infiniband" not in a and a != "--device")  # no EFA here
    before = len(imds_with_role.requests)

    outputs = _run_gang_container(tmp_path / "gang", container_engine, imds_with_role, engine_args, rendezvous_store)

    probe = (outputs / "imds.txt").read_text()
    assert "Connection refused" in probe and "nc=1" in probe, probe
    assert len(imds_with_role.requests) == before, "not one request of the container reached IMDS"
    agents = Imds(imds_with_role.url)
    keys = json.loads(agents.get(f"meta-data/iam/security-credentials/{ROLE}") or "{}")
    assert keys["AccessKeyId"] == "ASIAINSTANCEROLE", "the agent, on the same host, still reads IMDS"
    assert json.loads((outputs / "session.json").read_text())["AccessKeyId"] == "ASIATRAINERROLE", (
        "the trainer reads its trainer-role session (credential_process) through the read-only mount"
    )
    assert (tmp_path / "gang" / "checkpoints" / "step.txt").read_text() == "saved\n", "bind mounts stay writable"
    rdzv = (outputs / "rdzv.txt").read_text()
    assert rdzv == "store here\n", f"the host network still reaches the c10d store on the same address: {rdzv!r}"
    packet = (outputs / "packet.txt").read_text()
    assert "arping: socket: Operation not permitted" in packet, packet

    # The same container without the block's cgroup parent reaches IMDS: the probe can tell.
    bare = engine_args[: -len(block_args)]
    outputs = _run_gang_container(tmp_path / "bare", container_engine, imds_with_role, bare, rendezvous_store)
    assert " 200 OK" in (outputs / "imds.txt").read_text(), "without the block the host network reaches IMDS"
    assert "Operation not permitted" not in (outputs / "packet.txt").read_text(), "and packet sockets are allowed"


@pytest.mark.slow
def test_the_block_installs_idempotently_and_fails_closed_when_its_rule_is_gone(real_block):
    real_block.install()
    real_block.install()
    listed = subprocess.run(["iptables", "-w", "-S", imds_block.CHAIN], capture_output=True, text=True, check=True)
    ours = [line for line in listed.stdout.splitlines() if real_block.targets[-1].address in line]
    assert len(ours) == 1, listed.stdout
    jumps = subprocess.run(["iptables", "-w", "-S", "OUTPUT"], capture_output=True, text=True, check=True).stdout
    assert jumps.count(f"-j {imds_block.CHAIN}") == 1, jumps

    driver = real_block.driver()
    real_block.remove(driver)
    cgroup = TrainerCgroup(driver)
    with pytest.raises(BlockError, match=r"was not refused by IMDS at .*: the gang does not start$"):
        real_block.probe(cgroup, real_block.make_parent(cgroup, real_block.root()))
    left = subprocess.run(["iptables", "-w", "-S", "OUTPUT"], capture_output=True, text=True, check=True).stdout
    assert imds_block.CHAIN not in left, "the chain and its jump went with the last rule"


@pytest.mark.slow
def test_a_running_container_is_found_in_the_blocked_cgroup_and_one_started_outside_it_is_refused(
    container_engine, real_block
):
    """The engine's own placement, checked as the agent checks it after `run` (imds_block.check_container)."""
    args = real_block.install()
    parent = "/" + args[args.index("--cgroup-parent") + 1].lstrip("/")
    docker = str(container_engine.docker)
    started = []
    try:
        for name, extra in (("ti-placement-in", args[:2]), ("ti-placement-out", ())):
            subprocess.run([docker, "rm", "-f", name], capture_output=True, check=False)
            subprocess.run([docker, "run", "-d", "--name", name, *extra, LOCAL_IMAGE, "sleep", "120"],
                           capture_output=True, check=True)  # fmt: skip
            started.append(name)
        path = imds_block.check_container(docker, "ti-placement-in", parent)
        assert imds_block.under(path, parent) and path != parent, path
        with pytest.raises(BlockError, match=f"not under {parent} where IMDS is blocked: it is stopped$"):
            imds_block.check_container(docker, "ti-placement-out", parent)
    finally:
        for name in started:
            subprocess.run([docker, "rm", "-f", "-t", "0", name], capture_output=True, check=False)


def test_a_trainer_environment_that_sets_the_gangs_rendezvous_variables_fails_the_attempt_before_it_starts(tmp_path):
    """PET_NNODES=1 from a request that skipped launch's check would make node 0 train alone: the agent ends it."""
    agent = _agent(tmp_path, runtime="process")
    (agent.state / "trainer.env").write_text("LR=0.1\nPET_NNODES=1\n")
    with pytest.raises(GangError, match=r"^the trainer's environment has PET_NNODES set by the run: the agent sets"):
        gang.launch(agent, "python train.py")
    assert (agent.state / "trainer.env").read_text() == "LR=0.1\nPET_NNODES=1\n", "nothing written"
