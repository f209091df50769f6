"""The supervisor's Optuna layer (training_infra/supervisor/layer.py): its pins are the venv's, what it leaves out is
never imported by the sweep code, and its zip is the same bytes whenever the same files go in."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from training_infra.supervisor import layer

ROOT = Path(__file__).resolve().parents[2]


def _versions(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def test_the_layers_pins_are_the_versions_the_cli_and_the_tests_run():
    runtime, lambda_pins = _versions(ROOT / "requirements.txt"), _versions(layer.REQUIREMENTS)
    assert lambda_pins and {name: runtime.get(name) for name in lambda_pins} == lambda_pins


def test_the_sweep_code_runs_optuna_without_what_the_layer_leaves_out():
    """sqlalchemy, alembic, Mako and PyYAML are not in the layer: the supervisor's imports and a whole ask, report,
    prune and tell with the journal storage must work with them unimportable."""
    script = """
import sys
for name in ("sqlalchemy", "alembic", "mako", "yaml"):
    sys.modules[name] = None  # any import of them now fails
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from training_infra.supervisor.runtime import journal, sweeps
storage = JournalStorage(JournalFileBackend(sys.argv[1]))
study = optuna.create_study(storage=storage, study_name="g", pruner=optuna.pruners.MedianPruner(n_startup_trials=0))
for value in (0.5, 0.1):
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)})
    trial.report(value, 1)
    trial.should_prune()
    study.tell(trial, value)
print("best", study.best_value)
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(Path(os.environ.get("TMPDIR", "/tmp")) / f"journal-{os.getpid()}.log")],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "best 0.1" in done.stdout


def test_the_layer_zip_is_the_same_bytes_for_the_same_files(tmp_path):
    site = tmp_path / "in" / "python" / "pkg"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("x = 1\n")
    (site / "data.bin").write_bytes(b"\0" * 100)
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    layer._deterministic_zip(tmp_path / "in", first)
    os.utime(site / "__init__.py", (0, 10**9))  # another machine's file times
    layer._deterministic_zip(tmp_path / "in", second)

    assert first.read_bytes() == second.read_bytes()
    assert zipfile.ZipFile(first).namelist() == ["python/pkg/__init__.py", "python/pkg/data.bin"]


def test_two_synths_at_once_on_a_new_machine_build_the_layer_once(tmp_path, monkeypatch):
    """The test workers' first synths start together on a fresh CI machine: one pip install, the other waits."""
    import threading
    import time

    monkeypatch.setenv("TI_LAYER_CACHE", str(tmp_path / "cache"))
    builds: list[Path] = []

    def slow_build(wanted: list[str], target: Path) -> None:
        builds.append(target)
        time.sleep(0.5)  # both callers are inside layer_zip by then
        target.write_bytes(b"zip")

    monkeypatch.setattr(layer, "_build", slow_build)
    found: list[Path] = []
    callers = [threading.Thread(target=lambda: found.append(layer.layer_zip())) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=30)

    assert len(builds) == 1 and found == [builds[0], builds[0]]
    assert builds[0].read_bytes() == b"zip"
