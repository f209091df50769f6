"""Render the instance agent's EC2 user data: its settings and a small bootstrap that fetches the agent.

One renderer serves both launch paths: the launch template (CDK, values may be CloudFormation
tokens) and `training-infra launch` (which takes the template's user data and adds per-run
overrides), so a run started either way boots the same agent with the same settings.

Layout of the rendered script:
    #!/bin/bash
    export TI_...='stack value'            # one line per AgentConfig field (tokens allowed)
    #@run-overrides                        # `with_run_overrides` puts per-run exports here
    <bootstrap: OS deadline, download the agent from S3, check its sha256, unpack, exec agent.sh>

The agent folder (agent.sh and the Python helpers it calls) is packed deterministically (fixed
times, owners and order, so `cdk diff` stays quiet) and compressed with xz (`tar -J` needs
xz-utils, in every Ubuntu and Amazon Linux image). It no longer fits EC2's 16 KB user-data limit
with room for a run's overrides, so it travels as an S3 object (a CDK file asset in the bootstrap
bucket, readable by the instance role alone): user data pins its sha256, so a changed object is
refused, and arms the on-box deadline before the download, so a box whose agent never arrives
still powers off.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import lzma
import re
import shlex
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

AGENT_DIR = Path(__file__).parent / "agent"
AGENT_SCRIPT = AGENT_DIR / "agent.sh"
AGENT_FILES = (AGENT_SCRIPT, AGENT_DIR / "agent_tools.py")  # what the instance unpacks, beside each other
OVERRIDES_MARKER = "#@run-overrides"
USER_DATA_LIMIT_BYTES = 16 * 1024
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


@dataclass(frozen=True)
class AgentObject:
    """Where the packed agent lives in S3 (values may be CloudFormation tokens) and its sha256."""

    bucket: str
    key: str
    sha256: str


@dataclass(frozen=True)
class AgentConfig:
    """What the agent needs to know; each field becomes `TI_<FIELD>` in its environment."""

    data_bucket: str
    outputs_bucket: str
    image_uri: str  # repository URI without tag; the tag is `image_tag`
    image_tag: str = "latest"
    training_command: str = ""
    run_id: str = ""  # empty: the agent derives one from the date and the instance id
    region: str = ""
    log_group: str = ""
    alerts_topic_arn: str = ""
    metric_namespace: str = "TrainingInfra"
    max_runtime_seconds: int = 12 * 3600
    # The run's one absolute deadline (ISO 8601 UTC), shared by every attempt; empty: the
    # `training-infra:deadline` tag if the instance has one, else max_runtime_seconds from boot.
    deadline_at: str = ""
    auto_shutdown: bool = True
    idle_seconds: int = 30 * 60
    idle_gpu_percent: float = 5
    # No progress in HEARTBEAT_FILE for this long (after the first beat) ends the attempt `stalled`; 0: off.
    stall_seconds: int = 20 * 60
    checkpoint_sync_seconds: int = 300
    spot_poll_seconds: int = 5
    stop_grace_seconds: int = 60
    market: str = "spot"  # spot | on-demand
    hourly_price_usd: float = 0.0  # on-demand list price, for the cost estimate
    extra_env: str = ""  # newline-separated KEY=VALUE passed to the trainer
    stop_on_rebalance: bool = True  # false: a rebalance notice only syncs checkpoints early
    trainer_role_arn: str = ""  # empty: the container gets no AWS credentials, only the region
    secrets_reader_role_arn: str = ""  # assumed with a session policy naming only the run's TI_SECRETS


def _export(name: str, value: object) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"export {name}={shlex.quote(str(value))}"


def shipped_bytes(path: Path) -> bytes:
    """A file as the instance gets it: comment lines (for readers of this repository, about a quarter
    of agent.sh) stay here, and so do agent.sh's indentation and blank lines, so the agent fits the
    user-data limit.
    Neither file has a heredoc or a multi-line string whose lines start with `#` (nor, in agent.sh,
    one whose leading blanks matter); the tests run what is shipped."""
    if path.suffix == ".py":
        return _without_docstrings(path.read_text()).encode()
    first, *rest = path.read_text().splitlines(keepends=True)
    kept = [line for line in rest if not line.lstrip().startswith("#")]
    if path.suffix == ".sh":
        kept = [line.lstrip() for line in kept]
    return (first + "".join(kept)).encode()


def _without_docstrings(source: str) -> str:
    """The same Python without docstrings and comments (`ast.unparse`): the code the box runs, smaller."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return "#!/usr/bin/env python3\n" + ast.unparse(tree) + "\n"


def pack_agent() -> bytes:
    """AGENT_FILES as a tar.xz that is byte-for-byte the same for the same files (xz stores no time)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in AGENT_FILES:
            data = shipped_bytes(path)
            info = tarfile.TarInfo(path.name)
            info.size, info.mode, info.mtime = len(data), 0o755 if path.suffix == ".sh" else 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(buffer.getvalue(), format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)


def agent_sha256() -> str:
    return hashlib.sha256(pack_agent()).hexdigest()


# Runs before the agent exists on the box: the OS deadline first (the agent re-arms it for the run's
# own deadline), then the download with bounded retries, the pinned checksum, and exec. Anything that
# fails powers the box off (auto_shutdown) or leaves it to that deadline; a bad agent never runs.
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
if echo "$agent_sha256  $agent_dir/agent.tar.xz" | sha256sum -c --status &&
  tar -xJf "$agent_dir/agent.tar.xz" --no-same-owner -C "$agent_dir"; then
  say "agent s3://$agent_bucket/$agent_key fetched and checked in $((($(date +%s%N) - started) / 1000000)) ms"
  exec bash "$agent_dir/agent.sh"
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
