"""The supervisor's Lambda layer: Optuna and what `import optuna` loads, from pinned wheels, without Docker.

Sweeps run inside the supervisor (runtime/sweeps.py), so its Lambda must import Optuna. The layer is
`pip install --no-deps --only-binary=:all:` of requirements-lambda.txt for the Lambda's own platform
(Python 3.14 on arm64: manylinux wheels, no compiler, no container), zipped with fixed times and order,
and kept in a cache named by the hash of the pins and the platform. So a synth builds it once per
machine and pin set (a few seconds from pip's cache), every later synth only finds the file, and the
same pins always give the same bytes: the asset hash, and so the deployed layer, change only with a pin
(docs/architecture.md, "Sweeps"). No .pyc files: they are made by the interpreter that runs them, and
this machine's Python is not the Lambda's.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements-lambda.txt"
PYTHON_VERSION = "3.14"  # monitored_function.PYTHON_RUNTIME
PLATFORM = "manylinux_2_28_aarch64"  # lambda_.Architecture.ARM_64 on Amazon Linux 2023 (glibc 2.34)
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class LayerBuildError(RuntimeError):
    """pip could not make the layer; the message holds its last lines."""


def pins(requirements: Path = REQUIREMENTS) -> list[str]:
    return [
        line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines() if line.split("#", 1)[0].strip()
    ]


def cache_dir() -> Path:
    from training_infra.cache import cache_dir as user_cache

    return Path(os.environ.get("TI_LAYER_CACHE") or user_cache() / "layers")


def layer_zip(requirements: Path = REQUIREMENTS) -> Path:
    """The layer's zip, built if this pin set has none yet."""
    wanted = pins(requirements)
    digest = hashlib.sha256("\n".join([PLATFORM, PYTHON_VERSION, *wanted]).encode()).hexdigest()[:16]
    target = cache_dir() / f"supervisor-layer-{digest}.zip"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two synths at once (the test workers' first ones, on a new machine) build it once: the second waits.
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _build(wanted, target)
    return target


def _build(wanted: list[str], target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="ti-layer-") as tmp:
        site = Path(tmp) / "python"  # where Lambda puts a layer's python/ on the path
        command = [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
            "--no-compile", "--only-binary=:all:", "--implementation", "cp", "--python-version", PYTHON_VERSION,
            "--platform", PLATFORM, "--target", str(site), *wanted,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise LayerBuildError(f"the supervisor's layer ({', '.join(wanted)}) could not be installed: {tail}")
        shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts name this machine's interpreter
        partial = target.with_suffix(f".{os.getpid()}.partial")
        _deterministic_zip(Path(tmp), partial)
        os.replace(partial, target)  # a reader never sees a half-written zip


def _deterministic_zip(root: Path, path: Path) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for file in files:
            info = zipfile.ZipInfo(file.relative_to(root).as_posix(), date_time=FIXED_TIME)
            info.external_attr = (0o755 if os.access(file, os.X_OK) else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, file.read_bytes())


def unzipped_bytes(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist())
