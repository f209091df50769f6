"""A real container engine for the local AWS, so the agent's production `docker` path runs here.

The agent on EC2 logs in to ECR, pulls the training image, runs it with `docker run --gpus all
--init ...` and stops it with `docker stop -t GRACE`. `ContainerEngine` gives that path real parts:
- podman, with a private configuration under the engine's folder (runc, cgroupfs, file events,
  the host's network so no iptables rule changes, ulimits within the caller's hard limits, its own
  image store), behind a `docker` script that execs podman (not the Docker CLI on podman's socket,
  where `docker run --rm` always returns 0);
- Debian's docker-registry on a loopback address, port 80, with basic auth for user `AWS` and the
  password moto's ECR hands out, playing the account's ECR registry: commands started through
  `in_namespace` see `<account>.dkr.ecr.<region>.amazonaws.com` resolve to it (a private mount
  namespace with its own /etc/hosts), as a box in a VPC sees ECR through its endpoint; so the
  agent's real ECR login (`aws ecr get-login-password | docker login`) is what lets it pull;
- a trainer image built here with no base from the internet: `FROM scratch`, busybox and its
  applets, and training_infra/local/busybox_trainer.sh as the CMD;
- on request, examples/trainer/Dockerfile itself, its `FROM python:3.12-slim` (Docker Hub, out of
  reach here) replaced by a Debian python3 + pip base made from this machine's installed Debian
  packages (`build_example_trainer`; its `pip install` reaches PyPI through the host network).
`stop()` removes every container and image it made and stops the registry by its process id.
Needs root and Debian's podman, runc, catatonit, busybox-static, docker-registry and apache2-utils
(scripts/setup_container_engine.sh installs them); `unavailable_reason()` says what is missing.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

TOOLS = ("podman", "runc", "catatonit", "busybox", "docker-registry", "htpasswd", "unshare")
TRAINER_SCRIPT = Path(__file__).with_name("busybox_trainer.sh")
LOCAL_IMAGE = "localhost/training-infra-busybox-trainer:local"
PYTHON_BASE_IMAGE = "localhost/training-infra-debian-python:local"
EXAMPLE_IMAGE = "localhost/training-infra-example-trainer:local"
EXAMPLE_CONTEXT = Path(__file__).resolve().parents[2] / "examples" / "trainer"
# python3 and pip as Debian installs them, /bin/sh for the Dockerfile's RUN lines, and the C++
# runtime that python:3.12-slim also has (numpy's wheels need it).
PYTHON_BASE_PACKAGES = ("python3", "python3-pip", "dash", "libstdc++6")
# Documentation, configuration and state stay out of the base; pip may install (no PEP 668 marker).
_NOT_IN_BASE = re.compile(r"^/(usr/share/(doc|man|info|locale|lintian)/|etc/|var/)|/EXTERNALLY-MANAGED$")
ECR_USER = "AWS"


def ecr_password(account: str) -> str:
    """What moto's ECR returns from GetAuthorizationToken (and so `aws ecr get-login-password`)."""
    return f"{account}-auth-token"


def unavailable_reason() -> str | None:
    """Why the engine cannot run on this machine, in one line; None when it can."""
    if os.geteuid() != 0:
        return "the container engine needs root (podman, a registry on port 80, a mount namespace)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed: run scripts/setup_container_engine.sh as root"
    return None


def free_loopback_address(port: int = 80) -> str:
    """A random 127.x.y.z where `port` is free: every engine (and every stand-in registry) gets its own."""
    for _ in range(50):
        address = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 254)}"  # noqa: S311
        with socket.socket() as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue
        return address
    raise RuntimeError(f"no free loopback address for port {port}")


class ContainerEngine:
    """`with ContainerEngine(folder) as engine:` then `engine.push_trainer(repository, tag)`, and run
    the agent with `engine.in_namespace([...])` and `TI_DOCKER=engine.docker`."""

    def __init__(self, workdir: Path, *, account: str = "123456789012", region: str = "us-east-1") -> None:
        self.workdir = Path(workdir)
        self.account = account
        self.region = region
        self.registry_host = f"{account}.dkr.ecr.{region}.amazonaws.com"
        self.registry_address = ""
        self.docker = self.workdir / "bin" / "docker"
        self._registry: subprocess.Popen[bytes] | None = None
        self._podman = shutil.which("podman") or "podman"
        # podman's runroot (its containers' runtime state, conmon's sockets) in a short folder of its own:
        # under a long one (pytest's tmp folders) every `docker run` took 20 s more (20.4 s against 0.4 s,
        # measured with runroots of 51 and 14 characters; one of 27 was fast too; the cause is not pinned down).
        self.runroot: Path | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> ContainerEngine:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        for folder in ("bin", "storage", "tmp", "registry", "image", "auth"):
            (self.workdir / folder).mkdir(parents=True, exist_ok=True)
        self.runroot = Path(tempfile.mkdtemp(prefix="ti-podman-"))
        self._write_configuration()
        self._start_registry()
        self._build_trainer_image()
        return self

    def stop(self) -> None:
        """Every container and image of this engine removed, the registry stopped by its pid, and
        their storage deleted."""
        try:
            if (self.workdir / "storage").exists():
                self.podman("rm", "--all", "--force", "--time", "0", check=False)
                self.podman("rmi", "--all", "--force", check=False)
            # podman's overlay driver bind-mounts its folder on itself; in this namespace only if podman ran here.
            overlay = self.workdir / "storage" / "overlay"
            if os.path.ismount(overlay):
                subprocess.run(["umount", str(overlay)], check=False)
        finally:
            if self._registry is not None and self._registry.poll() is None:
                self._registry.terminate()
                try:
                    self._registry.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._registry.kill()
                    self._registry.wait()
            self._registry = None
            for folder in ("registry/data", "storage", "tmp"):
                shutil.rmtree(self.workdir / folder, ignore_errors=True)
            if self.runroot is not None:
                shutil.rmtree(self.runroot, ignore_errors=True)

    @property
    def registry_pid(self) -> int | None:
        """The registry's process id, also its process group's (start_new_session)."""
        return self._registry.pid if self._registry is not None else None

    def __enter__(self) -> ContainerEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- what callers use
    @property
    def env(self) -> dict[str, str]:
        """podman's private configuration (the `docker` script sets the same)."""
        return {
            "CONTAINERS_CONF": str(self.workdir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.workdir / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.workdir / "registries.conf"),
        }

    def image_uri(self, repository: str) -> str:
        """The ECR repository URI (no tag) as the compute stack would pass it."""
        return f"{self.registry_host}/{repository}"

    def in_namespace(self, argv: list[str], *, registry_address: str | None = None) -> list[str]:
        """`argv` in a private mount namespace where the ECR host name resolves to the local registry
        (or to `registry_address`, e.g. a stand-in that stalls). Nothing outside it changes."""
        address = registry_address or self.registry_address
        hosts = self.workdir / f"hosts-{address}"
        if not hosts.exists():
            hosts.write_text(Path("/etc/hosts").read_text() + f"\n{address} {self.registry_host}\n")
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, str(hosts), *argv]

    def podman(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env, "REGISTRY_AUTH_FILE": str(self.workdir / "auth" / "engine.json")}
        return subprocess.run(
            self.in_namespace([self._podman, *args]),
            env=env,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def push_trainer(self, repository: str, tag: str, *, image: str = LOCAL_IMAGE) -> str:
        """Push a local image (the busybox trainer by default) as `<ECR host>/<repository>:<tag>`."""
        reference = f"{self.image_uri(repository)}:{tag}"
        self.podman("tag", image, reference)
        self.podman("push", "--quiet", reference)
        self.podman("rmi", reference)  # the agent's pull, not this push, must bring the image into use
        return reference

    def manifest(self, repository: str, tag: str) -> str:
        """The image manifest the registry holds for `repository:tag`, exactly as it serves it: what ECR's
        PutImage takes, so the emulator's ECR API lists the image this registry serves."""
        request = urllib.request.Request(  # noqa: S310 - the engine's own loopback registry
            f"http://{self.registry_address}/v2/{repository}/manifests/{tag}",
            headers={
                "Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                "application/vnd.oci.image.manifest.v1+json",
                "Authorization": "Basic "
                + base64.b64encode(f"{ECR_USER}:{ecr_password(self.account)}".encode()).decode(),
            },
        )
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return answer.read().decode()

    def containers(self) -> list[str]:
        """Names of every container of this engine, running or not."""
        out = self.podman("ps", "--all", "--format", "{{.Names}}").stdout
        return out.split()

    def images(self) -> list[str]:
        out = self.podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
        return out.split()

    # ---------------------------------------------------------------- set-up
    def _write_configuration(self) -> None:
        work = self.workdir
        hard_nofile, hard_nproc = _hard_limit("RLIMIT_NOFILE", 20000), _hard_limit("RLIMIT_NPROC", 32768)
        (work / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={hard_nofile}:{hard_nofile}", "nproc={hard_nproc}:{hard_nproc}"]\n'
            'netns = "host"\n'  # the host's network: no bridge, no iptables rule
            f'init_path = "{shutil.which("catatonit")}"\n'
            "[engine]\n"
            'runtime = "runc"\n'  # crun fails on this kernel's cgroup layout
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{work / "tmp" / "events.log"}"\n'
            f'tmp_dir = "{work / "tmp"}"\n'
        )
        (work / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{work / "storage"}"\nrunroot = "{self.runroot}"\n'
        )
        (work / "registries.conf").write_text(
            f'unqualified-search-registries = []\n[[registry]]\nlocation = "{self.registry_host}"\ninsecure = true\n'
        )
        exports = " ".join(f"{name}={value}" for name, value in self.env.items())
        self.docker.write_text(
            "#!/bin/sh\n"
            "# `docker` on the local box: podman, configured by training_infra/local/containers.py.\n"
            f"export {exports}\n"
            "# Logins go where Docker keeps them: $HOME/.docker/config.json (podman reads that format,\n"
            "# but refuses one that does not exist yet).\n"
            'export REGISTRY_AUTH_FILE="${REGISTRY_AUTH_FILE:-${HOME:-/root}/.docker/config.json}"\n'
            '[ -f "$REGISTRY_AUTH_FILE" ] ||\n'
            '  { mkdir -p "${REGISTRY_AUTH_FILE%/*}" && echo "{}" >"$REGISTRY_AUTH_FILE"; }\n'
            f'exec {self._podman} "$@"\n'
        )
        self.docker.chmod(0o755)

    def _start_registry(self) -> None:
        registry = self.workdir / "registry"
        htpasswd = subprocess.run(
            ["htpasswd", "-nbB", ECR_USER, ecr_password(self.account)], capture_output=True, text=True, check=True
        ).stdout
        (registry / "htpasswd").write_text(htpasswd)
        self.registry_address = free_loopback_address()
        config = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(registry / "data")}, "delete": {"enabled": True}},
            "auth": {"htpasswd": {"realm": "training-infra-local-ecr", "path": str(registry / "htpasswd")}},
            "http": {"addr": f"{self.registry_address}:80", "secret": "training-infra-local"},
        }
        (registry / "config.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
        with open(registry / "registry.log", "ab") as log:
            self._registry = subprocess.Popen(
                ["docker-registry", "serve", str(registry / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._registry.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited {self._registry.returncode}; see {registry / 'registry.log'}"
                )
            try:
                urllib.request.urlopen(f"http://{self.registry_address}/v2/", timeout=1)  # noqa: S310
            except urllib.error.HTTPError as answer:
                if answer.code == 401:  # up, and asking for the ECR credentials
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"docker-registry did not answer on {self.registry_address}:80 within 20 s")
        self.podman("login", "--username", ECR_USER, "--password", ecr_password(self.account), self.registry_host)

    def _build_trainer_image(self) -> None:
        """FROM scratch: static busybox, its applets as links, the trainer script; nothing downloaded."""
        context = self.workdir / "image"
        rootfs = context / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        (rootfs / "bin").mkdir(parents=True)
        (rootfs / "app").mkdir()
        (rootfs / "tmp").mkdir(mode=0o1777)
        busybox = rootfs / "bin" / "busybox"
        shutil.copy2(Path(shutil.which("busybox") or "busybox").resolve(), busybox)
        applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (rootfs / "bin" / applet).symlink_to("busybox")
        shutil.copy2(TRAINER_SCRIPT, rootfs / "app" / "train.sh")
        (rootfs / "app" / "train.sh").chmod(0o755)
        (context / "Containerfile").write_text(
            "FROM scratch\n"
            "COPY rootfs/ /\n"
            "ENV PATH=/bin DATA_DIR=/data OUTPUT_DIR=/outputs CHECKPOINT_DIR=/checkpoints\n"
            "WORKDIR /app\n"
            'CMD ["/app/train.sh"]\n'
        )
        self.podman(
            "build", "--quiet", "--network", "none", "--tag", LOCAL_IMAGE,
            "--file", str(context / "Containerfile"), str(context),
        )  # fmt: skip

    def build_example_trainer(self) -> str:
        """examples/trainer/Dockerfile as written, but `FROM` a python base made here (see module doc)."""
        context = self.workdir / "python-base"
        rootfs = context / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        _copy_installed_packages(PYTHON_BASE_PACKAGES, rootfs)
        for link, target in (("sh", "dash"), ("python", "python3")):  # as dash's and python-is-python3's
            if not (rootfs / "usr" / "bin" / link).is_symlink():
                (rootfs / "usr" / "bin" / link).symlink_to(target)
        (rootfs / "etc" / "ssl" / "certs").mkdir(parents=True)
        shutil.copy2("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc" / "ssl" / "certs")  # pip's TLS to PyPI
        (rootfs / "tmp").mkdir(mode=0o1777)
        (context / "Containerfile").write_text(
            'FROM scratch\nCOPY rootfs/ /\nENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8\nCMD ["python3"]\n'
        )
        self.podman("build", "--quiet", "--network", "none", "--tag", PYTHON_BASE_IMAGE, str(context))
        self.podman(
            "build", "--quiet", "--network", "host", "--from", PYTHON_BASE_IMAGE, "--tag", EXAMPLE_IMAGE,
            str(EXAMPLE_CONTEXT), timeout=900,
        )  # fmt: skip
        return EXAMPLE_IMAGE


def _copy_installed_packages(roots: tuple[str, ...], rootfs: Path) -> None:
    """The files of `roots` and of everything they depend on, as dpkg installed them on this machine."""
    listing = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Abbrev}\t${Package}\t${binary:Package}\t${Pre-Depends},${Depends}\n"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    installed: dict[str, tuple[str, list[str]]] = {}
    for line in listing.splitlines():
        status, name, qualified, depends = line.split("\t")
        if status.startswith("ii"):
            installed[name] = (qualified, [d for d in depends.split(",") if d.strip()])
    wanted, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        for alternatives in installed[name][1]:  # "libc6 (>= 2.34)", "a | b", "python3:any"
            names = [re.sub(r"\(.*?\)", "", a).strip().split(":")[0] for a in alternatives.split("|")]
            chosen = next((n for n in names if n in installed), None)
            if chosen:
                todo.append(chosen)
    for top in ("bin", "sbin", "lib", "lib64"):  # Debian 12 merges /bin into /usr/bin and so on
        (rootfs / "usr" / top).mkdir(parents=True, exist_ok=True)
        (rootfs / top).symlink_to(f"usr/{top}")
    for name in sorted(wanted):
        for listed in Path(f"/var/lib/dpkg/info/{installed[name][0]}.list").read_text().splitlines():
            source, target = Path(listed), rootfs / listed.lstrip("/")
            if _NOT_IN_BASE.search(listed) or (source.is_dir() and not source.is_symlink()):
                continue
            if target.exists() or target.is_symlink() or not (source.exists() or source.is_symlink()):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                target.symlink_to(os.readlink(source))
            else:
                shutil.copy2(source, target)


def _hard_limit(name: str, wanted: int) -> int:
    """`wanted`, or the caller's hard limit if lower (podman fails to set more: "Operation not permitted")."""
    hard = resource.getrlimit(getattr(resource, name))[1]
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
