"""Render the instance agent's EC2 user data: its settings and a small bootstrap that fetches the agent.

One renderer serves both launch paths: the launch template (CDK, values may be CloudFormation
tokens) and `training-infra launch` (which takes the template's user data and adds per-run
overrides), so a run started either way boots the same agent with the same settings.

Layout of the rendered script:
    #!/bin/bash
    export TI_...='stack value'            # one line per AgentConfig field (tokens allowed)
    #@run-overrides                        # `with_run_overrides` puts per-run exports here
    <bootstrap: OS deadline, download the agent from S3, check its sha256, unpack, exec python3 on it>

The agent is the Python package `training_infra/compute/agent/ti_agent` plus botocore and its four
dependencies, copied from this venv at the versions requirements.txt pins and stripped to the
service models the agent's clients use (`ti_agent.aws.SERVICES`). botocore reads those models from
files, so the asset is a folder packed as a tar.xz (sorted entries, fixed times and owners, no
bytecode: byte-stable, so `cdk diff` stays quiet), not a zipapp. It travels as an S3 object (a CDK
file asset in the bootstrap bucket, readable by the instance role alone): user data pins its
sha256, so a changed object is refused before anything is unpacked, and arms the on-box deadline
before the download, so a box whose agent never arrives still powers off. `AgentConfig` is
declared once, in `ti_agent/settings.py`, which the agent parses its environment with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import lzma
import os
import re
import shlex
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from training_infra.cache import cache_dir
from training_infra.compute.agent.ti_agent.aws import SERVICES
from training_infra.compute.agent.ti_agent.settings import AgentConfig

AGENT_DIR = Path(__file__).parent / "agent"
AGENT_PACKAGE = AGENT_DIR / "ti_agent"
REQUIREMENTS = Path(__file__).parents[2] / "requirements.txt"
# The folder's entry point (`python3 -I <folder>` puts the folder first on sys.path and runs this).
AGENT_MAIN = b"import sys\n\nfrom ti_agent.agent import main\n\nsys.exit(main())\n"
# The distributions the asset vendors: botocore and what it imports (dateutil imports six).
VENDORED = ("botocore", "jmespath", "python-dateutil", "six", "urllib3")
_LICENSE = re.compile(r"(LICEN[CS]E|NOTICE|COPYING|AUTHORS)", re.IGNORECASE)
OVERRIDES_MARKER = "#@run-overrides"
USER_DATA_LIMIT_BYTES = 16 * 1024
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


@dataclass(frozen=True)
class AgentObject:
    """Where the packed agent lives in S3 (values may be CloudFormation tokens) and its sha256."""

    bucket: str
    key: str
    sha256: str


def _export(name: str, value: object) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"export {name}={shlex.quote(str(value))}"


def agent_files() -> list[Path]:
    """The package's modules, in a fixed order (no caches, no tests)."""
    return sorted(AGENT_PACKAGE.glob("*.py"))


def _pin(distribution: str) -> str:
    for line in REQUIREMENTS.read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == distribution:
            return version.strip()
    raise ValueError(f"requirements.txt pins no {distribution}: the agent's asset vendors only pinned packages")


def _vendored_file(top: str, parts: tuple[str, ...]) -> bool:
    """What of an installed distribution goes in: its modules and data, no bytecode, no scripts, and
    of botocore/data the shared files and the models of SERVICES alone."""
    if top.startswith("..") or "__pycache__" in parts or parts[-1].endswith((".pyc", ".pyo")):
        return False
    if top.endswith(".dist-info"):
        return bool(_LICENSE.search(parts[-1]))
    if parts[:2] == ("botocore", "data") and len(parts) > 3:
        return parts[2] in SERVICES
    return True


def vendored_files() -> list[tuple[str, Path]]:
    """(name in the asset, file in this venv) for the vendored distributions, at their pinned versions."""
    files = []
    for name in VENDORED:
        distribution = importlib.metadata.distribution(name)
        if distribution.version != _pin(name):
            raise ValueError(
                f"{name} {distribution.version} is installed but requirements.txt pins {_pin(name)}: run `make setup`"
            )
        for entry in distribution.files or ():
            parts = PurePosixPath(entry).parts
            if _vendored_file(parts[0], parts):
                files.append((PurePosixPath(*parts).as_posix(), Path(str(distribution.locate_file(entry)))))
    return files


def agent_entries() -> list[tuple[str, Path | bytes]]:
    """Every file of the asset, sorted by name: the entry point, the agent, the vendored packages."""
    entries: list[tuple[str, Path | bytes]] = [("__main__.py", AGENT_MAIN)]
    entries += [(f"ti_agent/{path.name}", path) for path in agent_files()]
    entries += vendored_files()
    return sorted(entries, key=lambda entry: entry[0])


def _tar_info(name: str, *, size: int = 0, folder: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = (tarfile.DIRTYPE, 0o755) if folder else (tarfile.REGTYPE, 0o644)
    info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = size, 0, 0, 0, "root", "root"
    return info


@functools.cache
def _packed(contents: tuple[tuple[str, bytes], ...]) -> bytes:
    """xz of the tar, kept on disk by the tar's digest: compressing the vendored botocore takes seconds,
    and every synth process (each `cdk synth`/`deploy`, each test's app) would pay them again."""
    tar = _tar(contents)
    digest = hashlib.sha256(tar + f"xz-preset-{XZ_PRESET}".encode()).hexdigest()[:32]
    kept = cache_dir() / "agent" / f"agent-{digest}.tar.xz"
    with contextlib.suppress(OSError, lzma.LZMAError):
        cached = kept.read_bytes()
        if lzma.decompress(cached) == tar:  # tens of ms: a damaged or edited file is never shipped
            return cached
    packed = lzma.compress(tar, format=lzma.FORMAT_XZ, preset=XZ_PRESET)
    with contextlib.suppress(OSError):
        kept.parent.mkdir(parents=True, exist_ok=True)
        partial = kept.with_name(f"{kept.name}.{os.getpid()}.partial")
        partial.write_bytes(packed)
        partial.replace(kept)  # atomic: another process never reads half a file
    return packed


XZ_PRESET = 6


def _tar(contents: tuple[tuple[str, bytes], ...]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        folders: set[str] = set()
        for name, data in contents:
            for parent in reversed(PurePosixPath(name).parents[:-1]):
                if str(parent) not in folders:
                    folders.add(str(parent))
                    archive.addfile(_tar_info(str(parent), folder=True))
            archive.addfile(_tar_info(name, size=len(data)), io.BytesIO(data))
    return buffer.getvalue()


def pack_agent() -> bytes:
    """The agent folder as a tar.xz: byte-for-byte the same for the same files (sorted names, mtime 0,
    root:root, fixed modes; xz stores no time). Packed once per process for the same contents."""
    contents = tuple(
        (name, source if isinstance(source, bytes) else source.read_bytes()) for name, source in agent_entries()
    )
    return _packed(contents)


def agent_sha256() -> str:
    return hashlib.sha256(pack_agent()).hexdigest()


# Runs before the agent exists on the box: the OS deadline first (the agent re-arms it for the run's
# own deadline), then the download with bounded retries, the pinned checksum, the unpack, and exec of
# the box's python3 on the agent's folder (-I: no PYTHON* variables, no user site, the folder first on
# sys.path, so the vendored botocore wins over any the AMI has). Anything that fails powers the box
# off (auto_shutdown) or leaves it to that deadline; a bad agent never runs.
_BOOTSTRAP = r"""agent_dir=${TI_ROOT:-}/opt/training-infra
setup_log=${TI_ROOT:-}/var/log/training-setup.log
mkdir -p "$agent_dir" "${setup_log%/*}"
say() { echo "$(date -u +%FT%TZ) [bootstrap] $*" | tee -a "$setup_log"; }
started=$(date +%s%N)
left=${TI_MAX_RUNTIME_SECONDS:-43200}
at=$(date -u -d "${TI_DEADLINE_AT:-}" +%s 2>/dev/null) && [[ -n ${TI_DEADLINE_AT:-} ]] && left=$((at - $(date +%s)))
"${TI_SHUTDOWN_BIN:-shutdown}" -h "+$((left > 60 ? (left + 59) / 60 : 1))" "training-infra: bootstrap deadline" ||
  say "WARNING: could not schedule the OS deadline"
region=()  # the regional endpoint: what a private subnet's S3 gateway endpoint carries
[[ -z ${TI_REGION:-} ]] || region=(--region "$TI_REGION")
for try in 1 2 3 4; do
  aws --cli-connect-timeout 10 s3 cp "s3://$agent_bucket/$agent_key" "$agent_dir/agent.tar.xz" "${region[@]}" \
    --only-show-errors && break
  say "agent download failed (attempt $try of 4)"
  sleep $((try * ${TI_RETRY_BASE_SECONDS:-5}))
done
# Checked before anything is unpacked; a fresh root-owned folder, so no file of an older agent remains.
unpacked=$agent_dir/agent
if echo "$agent_sha256  $agent_dir/agent.tar.xz" | sha256sum -c --status && rm -rf "$unpacked" &&
  mkdir -m 755 "$unpacked" && tar -xJf "$agent_dir/agent.tar.xz" -C "$unpacked" --no-same-owner; then
  say "agent s3://$agent_bucket/$agent_key fetched and checked in $((($(date +%s%N) - started) / 1000000)) ms"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' && exec python3 -I "$unpacked"
  say "the agent needs python3 3.11 or later; this box has $(python3 --version 2>&1)"
fi
say "no agent: s3://$agent_bucket/$agent_key missing, unreadable or not sha256 $agent_sha256"
[[ ${TI_AUTO_SHUTDOWN:-true} != true ]] || bash -c "${TI_POWEROFF_CMD:-shutdown -h now}"
"""


def render_user_data(config: AgentConfig, agent: AgentObject) -> str:
    lines = ["#!/bin/bash", "# training-infra instance agent (rendered by training_infra/compute/user_data.py)"]
    for field in dataclasses.fields(config):
        lines.append(_export(f"TI_{field.name.upper()}", getattr(config, field.name)))
    lines.append(OVERRIDES_MARKER)
    lines += [f"agent_{name}={shlex.quote(getattr(agent, name))}" for name in ("bucket", "key", "sha256")]
    return "\n".join(lines) + "\n" + _BOOTSTRAP


def with_run_overrides(user_data: str, overrides: Mapping[str, object]) -> str:
    """Add per-run settings (TI_RUN_ID, TI_IMAGE_TAG, ...) to rendered user data.

    The marker is the last line that is exactly the marker: nothing after it (the bootstrap) can
    contain one, while a quoted value before it (a training command) may, and must stay intact.
    """
    line = f"\n{OVERRIDES_MARKER}\n"
    position = user_data.rfind(line)
    if position < 0:
        raise ValueError("user data was not rendered by training-infra (no run-overrides marker)")
    exports = []
    for name, value in overrides.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"environment variable name {name!r} is not valid")
        exports.append(_export(name, value))
    rendered = user_data[: position + 1] + "".join(f"{export}\n" for export in exports) + user_data[position + 1 :]
    if len(rendered.encode()) > USER_DATA_LIMIT_BYTES:
        raise ValueError(f"user data is {len(rendered.encode())} bytes; EC2 allows {USER_DATA_LIMIT_BYTES}")
    return rendered
