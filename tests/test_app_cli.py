"""The real CDK CLI drives app.py: good settings synth, bad ones stop with one line and no traceback."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ROOT

CDK = ROOT / "node_modules" / ".bin" / "cdk"


def _cdk(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CDK_DISABLE_VERSION_CHECK": "true"}
    env.pop("AWS_ENDPOINT_URL", None)
    return subprocess.run(
        [str(CDK), "synth", "--quiet", "--no-notices", "--output", str(tmp_path / "cdk.out"), *args],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_cdk_synth_writes_all_four_stacks_without_an_account(tmp_path):
    result = _cdk(tmp_path, "-c", "github_repo=acme/trainer")
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(path.name for path in (tmp_path / "cdk.out").glob("*.template.json"))
    assert written == [f"TrainingInfra-{name}.template.json" for name in ("Compute", "Registry", "Safety", "Storage")]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("use_spot=maybe", "training-infra: setting 'use_spot': got 'maybe'; allowed: true or false"),
        ("instance_typ=g5.xlarge", "training-infra: unknown setting 'instance_typ': did you mean 'instance_type'?"),
    ],
)
def test_bad_setting_stops_cdk_synth_with_one_clear_line(tmp_path, flag, expected):
    result = _cdk(tmp_path, "-c", flag)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and "jsii" not in result.stderr.lower()
    assert not list((tmp_path / "cdk.out").glob("*.template.json")), "nothing was written"
