"""Keep a multi-node trainer's container away from IMDS while the agent on the same host keeps it (issue 25).

A gang's container runs with `--network host`: torchrun's c10d store, NCCL's and gloo's bootstrap and
EFA need the peers to reach the container on the host's own address, so a bridge (where the launch
template's hop limit of 1 stops IMDS) is no option. On the host network that hop limit protects
nothing: without this block the trainer could read the INSTANCE ROLE's credentials from IMDS.

How: the container starts under a cgroup parent known before it starts (`--cgroup-parent`, which
Docker and podman both take, with either cgroup driver), and an `iptables -m cgroup --path` rule
(the same with ip6tables) rejects every packet from a socket made in that cgroup's subtree to IMDS
(169.254.169.254, fd00:ec2::254, and the address the agent itself uses). The agent's own cgroup is
not in that subtree, so it keeps IMDS. A process in the container cannot leave its cgroup (its
cgroup namespace and the read-only cgroup mount without CAP_SYS_ADMIN keep it there), unlike a
supplementary-group owner match (root in the container may drop the group with CAP_SETGID); it
cannot change the rules (no CAP_NET_ADMIN in Docker's or podman's default set) nor send past them
with a packet socket (CAP_NET_RAW dropped).
Not a user namespace with an owner match: Docker has no per-container uid map (`--userns` takes only
`host`) and refuses `--network host` with daemon-wide `userns-remap`; and a mapped root could no
longer read the 0600 trainer-role session the agent mounts for it.

The kernel resolves the rule's path to a cgroup when the rule is added, so the parent is created
first and kept (a directory with cgroupfs, a started slice unit with systemd) and the rule is added
only then. Fail closed: unless a probe process placed in that cgroup is refused by the agent's own
IMDS endpoint, the gang does not start (`BlockError`, one line). Standard library only: it runs on
the box, as root.
"""

from __future__ import annotations

import errno
import ipaddress
import shlex
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .checkpoints import AttemptFailed

IMDS_V4 = "169.254.169.254"
IMDS_V6 = "fd00:ec2::254"  # IMDS on Nitro instances with the IPv6 endpoint on
CHAIN = "TI-TRAINER-IMDS"  # our own chain, jumped to from the top of OUTPUT
NAME = "training_infra_trainer"  # no dash: systemd reads a dash in a slice name as a level of nesting
SLICE = f"{NAME}.slice"
UNITS = Path("/run/systemd/system")  # runtime units: gone at reboot, like the box
PROBE_TIMEOUT_SECONDS = 3.0
# The probe exits 0 only when the connection was refused (our REJECT): any other end means not blocked.
PROBE = (
    "import errno, socket, sys\n"
    "s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
    "s.settimeout(float(sys.argv[3]))\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2])))\n"
    "except OSError as e:\n"
    "    print(errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__)\n"
    "    sys.exit(0 if e.errno == errno.ECONNREFUSED else 1)\n"
    "print('connected')\n"
    "sys.exit(1)\n"
)


class BlockError(AttemptFailed):
    """The block could not be put in place: the gang's trainer does not start (one line says why)."""


class CgroupDriver(StrEnum):
    SYSTEMD = "systemd"
    CGROUPFS = "cgroupfs"


@dataclass(frozen=True)
class Target:
    """Packets to `address` (to `port` only, when given) from the trainer's cgroup are rejected."""

    address: str
    port: int | None = None

    @property
    def ipv6(self) -> bool:
        return ":" in self.address

    def rule(self, cgroup_path: str) -> list[str]:
        """The iptables/ip6tables rule (without -A/-C/-D) that rejects it."""
        port = ["-p", "tcp", "--dport", str(self.port)] if self.port is not None else []
        return [CHAIN, "-d", self.address, *port, "-m", "cgroup", "--path", cgroup_path, "-j", "REJECT"]


def endpoint_address(endpoint: str) -> tuple[str, int]:
    """The address and port of the IMDS endpoint the agent uses (`http://<IP>[:port]`)."""
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname or ""
    try:
        address = str(ipaddress.ip_address(host))
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise BlockError(
            f"IMDS endpoint {endpoint!r} is not http://<IP address>[:port]: cannot keep the gang's trainer from it"
        ) from None
    return address, port


def targets(endpoint: str) -> list[Target]:
    """What to block: IMDS's two addresses whole, and the endpoint the agent uses. A non-IMDS endpoint
    (the local sandbox's fake IMDS on the instance's own 127.N.x.y) is blocked at its port only: the
    same address is where node 0's c10d store listens."""
    address, port = endpoint_address(endpoint)
    found = [Target(IMDS_V4), Target(IMDS_V6)]
    if address not in (IMDS_V4, str(ipaddress.ip_address(IMDS_V6))):
        found.append(Target(address, port))
    return found


def cgroup2_root(mounts: str) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup; /sys/fs/cgroup/unified on a hybrid box)."""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def cgroup_v2_path(proc_cgroup: str) -> str | None:
    """The unified hierarchy's path in a `/proc/<pid>/cgroup` (its `0::/path` line; v1 lines name controllers)."""
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            return path
    return None


def under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def check_container(
    docker: str,
    container: str,
    parent: str,
    *,
    env: Mapping[str, str] | None = None,
    run: Run = subprocess.run,
    proc: Path = Path("/proc"),
    attempts: int = 100,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """After the container started: its init (the engine's `inspect .State.Pid`, a host pid in Docker and podman)
    must be in the trainer's cgroup `parent` or below it, as the engine was asked (`--cgroup-parent`): the probe
    proved the rule, this proves the engine put the container where the rule looks. Returns its cgroup path, or
    BlockError (one line) when the engine placed it elsewhere or never told its pid."""
    said = ""
    for _ in range(attempts):
        try:
            done = run([docker, "inspect", "--format", "{{.State.Pid}}", container],
                       capture_output=True, text=True, timeout=20, check=False, env=env)  # fmt: skip
            said = (done.stdout or done.stderr or "").strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            said = str(error)
        if said.isdigit() and int(said) > 0:
            try:
                path = cgroup_v2_path((proc / said / "cgroup").read_text())
            except OSError as error:
                raise BlockError(f"the trainer container's cgroup could not be read ({error}): it is stopped") from None
            if path is None or not under(path, parent):
                raise BlockError(
                    f"the engine put the trainer container in cgroup {path or '(no cgroup v2 line)'}, not under"
                    f" {parent} where IMDS is blocked: it is stopped"
                )
            return path
        sleep(0.1)
    raise BlockError(f"`{docker} inspect` gave no pid for the trainer container ({said[:200]}): it is stopped")


def parse_driver(answer: str) -> CgroupDriver | None:
    try:
        return CgroupDriver(answer.strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class TrainerCgroup:
    """The trainer container's cgroup parent, as the engine takes it and as a path in the v2 hierarchy."""

    driver: CgroupDriver

    @property
    def parent(self) -> str:
        return f"{NAME}.slice" if self.driver is CgroupDriver.SYSTEMD else f"/{NAME}"

    @property
    def path(self) -> str:
        return f"/{NAME}.slice" if self.driver is CgroupDriver.SYSTEMD else f"/{NAME}"

    def engine_args(self) -> tuple[str, ...]:
        # Without CAP_NET_RAW: a packet socket (AF_PACKET) on the host network sends past netfilter, the
        # rule included. EFA does not need it: the kernel's uverbs create_qp asks for CAP_NET_RAW only for
        # IB_QPT_RAW_PACKET queue pairs, and EFA's are SRD (a driver type) and UD; NCCL's sockets are TCP.
        return ("--cgroup-parent", self.parent, "--cap-drop", "NET_RAW")


Run = Callable[..., subprocess.CompletedProcess]


class ImdsBlock:
    """`install()` puts the block in place (idempotent; every rule added once however often it runs) and
    answers the container engine's flags; `remove()` takes this endpoint's rules out again, and the chain
    with the last of them (tests; on a box the rules go with the power-off)."""

    def __init__(
        self,
        *,
        endpoint: str,
        docker: str,
        env: Mapping[str, str] | None = None,
        log: Callable[[str], None] = print,
        run: Run = subprocess.run,
        mounts: Path = Path("/proc/self/mounts"),
        units: Path = UNITS,
    ) -> None:
        self.endpoint = endpoint
        self.targets = targets(endpoint)
        self.docker = docker
        self.env = dict(env) if env is not None else None
        self.log = log
        self.run = run
        self.mounts = mounts
        self.units = units

    def _cmd(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        try:
            return self.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, env=self.env)
        except (OSError, subprocess.TimeoutExpired) as error:
            return subprocess.CompletedProcess(list(argv), 127, "", str(error))

    def _must(self, *argv: str, why: str) -> None:
        done = self._cmd(*argv)
        if done.returncode != 0:
            said = " ".join((done.stderr or done.stdout or "").split())[:300]
            raise BlockError(f"{why}: `{shlex.join(argv)}` exited {done.returncode} ({said})")

    # ------------------------------------------------------------ the pieces
    def driver(self) -> CgroupDriver:
        """The engine's cgroup driver: Docker's `.CgroupDriver`, else podman's `.Host.CgroupManager`."""
        for template in ("{{.CgroupDriver}}", "{{.Host.CgroupManager}}"):
            done = self._cmd(self.docker, "info", "--format", template)
            if done.returncode == 0 and (found := parse_driver(done.stdout)) is not None:
                return found
        raise BlockError(
            f"`{self.docker} info` names no cgroup driver (systemd or cgroupfs): cannot place the gang's trainer"
            " in a cgroup that is kept from IMDS"
        )

    def root(self) -> Path:
        try:
            found = cgroup2_root(self.mounts.read_text())
        except OSError:
            found = None
        if found is None:
            raise BlockError("no cgroup v2 hierarchy is mounted: cannot keep the gang's trainer from IMDS")
        return found

    def make_parent(self, cgroup: TrainerCgroup, root: Path) -> Path:
        """Create the parent and keep it: a rule made on a cgroup that is later removed and made again
        would hold the old one and match nothing."""
        folder = root / cgroup.path.lstrip("/")
        if cgroup.driver is CgroupDriver.SYSTEMD:
            unit = self.units / SLICE
            if not unit.exists():
                self.units.mkdir(parents=True, exist_ok=True)
                unit.write_text("[Unit]\nDescription=training-infra: multi-node trainer containers, kept from IMDS\n")
                self._must("systemctl", "daemon-reload", why="systemd did not load the trainer slice")
            self._must("systemctl", "start", SLICE, why="systemd did not start the trainer slice")
        else:
            folder.mkdir(exist_ok=True)
        if not folder.is_dir():
            raise BlockError(f"the trainer's cgroup {folder} does not exist after it was made")
        return folder

    def add_rules(self, cgroup: TrainerCgroup) -> None:
        for tool in ("iptables", "ip6tables"):
            family = [t for t in self.targets if t.ipv6 == (tool == "ip6tables")]
            if self._cmd(tool, "-w", "-n", "-L", CHAIN).returncode != 0:
                self._must(tool, "-w", "-N", CHAIN, why=f"{tool} could not make chain {CHAIN}")
            for target in family:
                rule = target.rule(cgroup.path)
                if self._cmd(tool, "-w", "-C", *rule).returncode != 0:
                    self._must(tool, "-w", "-A", *rule, why=f"{tool} refused the IMDS rule (is xt_cgroup there?)")
            if self._cmd(tool, "-w", "-C", "OUTPUT", "-j", CHAIN).returncode != 0:
                self._must(tool, "-w", "-I", "OUTPUT", "1", "-j", CHAIN, why=f"{tool} could not jump to {CHAIN}")

    def probe(self, cgroup: TrainerCgroup, folder: Path) -> str:
        """A process in the trainer's cgroup connects to the agent's own endpoint: only a refusal passes."""
        address, number = endpoint_address(self.endpoint)
        port = str(number)
        python = [sys.executable, "-I", "-c", PROBE, address, port, str(PROBE_TIMEOUT_SECONDS)]
        if cgroup.driver is CgroupDriver.SYSTEMD:
            argv = ["systemd-run", "--quiet", "--collect", "--scope", f"--slice={SLICE}", "--", *python]
            probe_dir = None
        else:
            probe_dir = folder / "imds-probe"
            probe_dir.mkdir(exist_ok=True)
            script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
            argv = ["sh", "-c", script, str(probe_dir), *python]
        try:
            done = self._cmd(*argv, timeout=PROBE_TIMEOUT_SECONDS + 30)
        finally:
            if probe_dir is not None:
                try:
                    probe_dir.rmdir()
                except OSError as error:
                    if error.errno not in (errno.ENOENT, errno.EBUSY):
                        raise
        said = " ".join((done.stdout + done.stderr).split())[:200]
        if done.returncode != 0:
            raise BlockError(
                f"a process in the trainer's cgroup {cgroup.path} was not refused by IMDS at"
                f" {address}:{port} ({said or f'exit {done.returncode}'}): the gang does not start"
            )
        return said

    # ------------------------------------------------------------ the whole
    def install(self) -> tuple[str, ...]:
        cgroup = TrainerCgroup(self.driver())
        folder = self.make_parent(cgroup, self.root())
        self.add_rules(cgroup)
        said = self.probe(cgroup, folder)
        shown = ", ".join(f"{t.address}:{t.port}" if t.port else t.address for t in self.targets)
        self.log(f"IMDS blocked for the trainer's cgroup {cgroup.path} ({shown}; probe: {said})")
        return cgroup.engine_args()

    def remove(self, driver: CgroupDriver) -> None:
        path = TrainerCgroup(driver).path
        for target in self.targets:
            tool = "ip6tables" if target.ipv6 else "iptables"
            while self._cmd(tool, "-w", "-C", *target.rule(path)).returncode == 0:
                self._must(tool, "-w", "-D", *target.rule(path), why=f"{tool} could not delete the IMDS rule")
        for tool in ("iptables", "ip6tables"):  # the chain and its jump go with the last rule
            listed = self._cmd(tool, "-w", "-S", CHAIN)
            if listed.returncode == 0 and not any(line.startswith("-A ") for line in listed.stdout.splitlines()):
                while self._cmd(tool, "-w", "-C", "OUTPUT", "-j", CHAIN).returncode == 0:
                    self._must(tool, "-w", "-D", "OUTPUT", "-j", CHAIN, why=f"{tool} could not delete the jump")
                self._must(tool, "-w", "-X", CHAIN, why=f"{tool} could not delete chain {CHAIN}")
