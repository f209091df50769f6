"""Render the instance agent's EC2 user data: its settings and a small bootstrap that fetches the agent.

One renderer serves both launch paths: the launch template (CDK, values may be CloudFormation
tokens) and `training-infra launch` (which takes the template's user data and adds per-run
overrides), so a run started either way boots the same agent with the same settings.

Layout of the rendered script:
    #!/bin/bash
    export TI_...='stack value'            # one line per AgentConfig field (tokens allowed)
    #@run-overrides                        # `with_run_overrides` puts per-run exports here
    <bootstrap: OS deadline, download the agent from S3, check its sha256, exec python3 on it>

The agent is the Python package `training_infra/compute/agent/ti_agent` (standard library only),
packed as a zipapp (fixed times and order, so `cdk diff` stays quiet) and compressed with xz. It
travels as an S3 object (a CDK file asset in the bootstrap bucket, readable by the instance role
alone): user data pins its sha256, so a changed object is refused, and arms the on-box deadline
before the download, so a box whose agent never arrives still powers off. `AgentConfig` is
declared once, in `ti_agent/settings.py`, which the agent parses its environment with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import lzma
import re
import shlex
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from training_infra.compute.agent.ti_agent.settings import AgentConfig

AGENT_DIR = Path(__file__).parent / "agent"
AGENT_PACKAGE = AGENT_DIR / "ti_agent"
# The zipapp's entry point: the package runs as `ti_agent`, its modules import each other relatively.
ZIPAPP_MAIN = b"import sys\n\nfrom ti_agent.agent import main\n\nsys.exit(main())\n"
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


def pack_agent() -> bytes:
    """The agent as a zipapp (`python3 agent.pyz`), compressed with xz: byte-for-byte the same for the
    same sources (fixed times and modes, sorted names; xz stores no time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        entries = [("__main__.py", ZIPAPP_MAIN)]
        entries += [(f"ti_agent/{path.name}", path.read_bytes()) for path in agent_files()]
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return lzma.compress(buffer.getvalue(), format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)


def agent_sha256() -> str:
    return hashlib.sha256(pack_agent()).hexdigest()


# Runs before the agent exists on the box: the OS deadline first (the agent re-arms it for the run's
# own deadline), then the download with bounded retries, the pinned checksum, and exec of the box's
# python3 on the agent. Anything that fails powers the box off (auto_shutdown) or leaves it to that
# deadline; a bad agent never runs.
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
  aws --cli-connect-timeout 10 s3 cp "s3://$agent_bucket/$agent_key" "$agent_dir/agent.pyz.xz" "${region[@]}" \
    --only-show-errors && break
  say "agent download failed (attempt $try of 4)"
  sleep $((try * ${TI_RETRY_BASE_SECONDS:-5}))
done
if echo "$agent_sha256  $agent_dir/agent.pyz.xz" | sha256sum -c --status &&
  xz -dc "$agent_dir/agent.pyz.xz" >"$agent_dir/agent.pyz"; then
  say "agent s3://$agent_bucket/$agent_key fetched and checked in $((($(date +%s%N) - started) / 1000000)) ms"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' && exec python3 "$agent_dir/agent.pyz"
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
