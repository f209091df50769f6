"""Policy gates on the real synthesized templates of every configuration that matters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGURATIONS
from training_infra import naming

VENV_BIN = Path(sys.executable).parent

# Every cdk-nag finding the app accepts, with its reason in code. A new one must be added here on purpose.
# `{data}` / `{outputs}`: the bucket ARN as the compute stack imports it (named through the construct).
ACKNOWLEDGED_NAG_FINDINGS = {
    "AwsSolutions-EC29",
    "AwsSolutions-IAM5[Resource::*]",
    "AwsSolutions-IAM5[Resource::{data}/data/*]",
    "AwsSolutions-IAM5[Resource::{outputs}/runs/*]",
    "AwsSolutions-IAM5[Resource::{outputs}/checkpoints/*]",
    "AwsSolutions-IAM5[Resource::{outputs}/runs/latest/*]",
    # The opt-in trainer role: its own run's prefixes, by the run-id session tag.
    "AwsSolutions-IAM5[Resource::{outputs}/runs/<aws:PrincipalTag/training-infra:run-id>/*]",
    "AwsSolutions-IAM5[Resource::{outputs}/checkpoints/<aws:PrincipalTag/training-infra:run-id>/*]",
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:cloudformation:<AWS::Region>:<AWS::AccountId>:stack/TrainingInfra-*/*]",
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:instance/*]",
    "AwsSolutions-S1",
}


def _known_findings(synthesized) -> set[str]:
    storage_view = synthesized.stack(naming.STORAGE_STACK)
    storage = storage_view.construct("Storage")
    exports = {
        json.dumps(output["Value"], sort_keys=True): output["Export"]["Name"]
        for output in storage_view.json["Outputs"].values()
        if "Export" in output
    }

    def imported(bucket) -> str:
        return exports[json.dumps({"Fn::GetAtt": [storage_view.logical_id(bucket), "Arn"]}, sort_keys=True)]

    names = {"data": imported(storage.data_bucket), "outputs": imported(storage.outputs_bucket)}
    return {finding.format(**names) for finding in ACKNOWLEDGED_NAG_FINDINGS}


def _acknowledgements(outdir: Path) -> dict[str, str]:
    """Rule id -> reason, from the construct tree metadata the synth wrote."""
    found: dict[str, str] = {}
    for manifest in outdir.glob("*.metadata.json"):
        for entries in json.loads(manifest.read_text()).values():
            for entry in entries:
                if "acknowledged" in entry.get("type", ""):
                    for key, reason in entry["data"].items():
                        found[key.split("::", 1)[-1]] = reason
    return found


@pytest.mark.parametrize("config", list(CONFIGURATIONS))
def test_cdk_nag_passes_and_only_known_findings_are_acknowledged_with_reasons(synth, config):
    synthesized = synth(config)  # the synth raises ValidationFailed while any finding is open
    acknowledged = {key: reason for key, reason in _acknowledgements(synthesized.outdir).items() if key.startswith("AwsSolutions-")}
    known = _known_findings(synthesized)
    assert set(acknowledged) <= known, set(acknowledged) - known
    for rule, reason in acknowledged.items():
        assert len(reason) > 30, f"{rule} needs a reason a reviewer would accept, got {reason!r}"


@pytest.mark.parametrize("config", list(CONFIGURATIONS))
def test_cfn_lint_reports_no_error_and_no_warning(synth, config):
    templates = sorted(str(path) for path in synth(config).outdir.glob("*.template.json"))
    result = subprocess.run([str(VENV_BIN / "cfn-lint"), *templates], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", list(CONFIGURATIONS))
def test_checkov_fails_nothing_and_every_skip_has_a_comment(synth, config):
    outdir = synth(config).outdir
    result = subprocess.run(
        [str(VENV_BIN / "checkov"), "-d", str(outdir), "--framework", "cloudformation", "--skip-download", "--quiet", "-o", "json"],
        capture_output=True,
        text=True,
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(check["check_id"], check["resource"]) for report in reports for check in report["results"]["failed_checks"]]
    assert failed == [], failed
    assert result.returncode == 0
    for template in outdir.glob("*.template.json"):
        for logical_id, resource in json.loads(template.read_text())["Resources"].items():
            for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
                assert len(skip.get("comment", "")) > 30, f"{template.name}:{logical_id} skips {skip['id']} without a real reason"
