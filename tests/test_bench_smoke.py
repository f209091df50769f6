"""Every `make bench` script runs to the end, once, at its smallest size (BENCH_SMOKE=1).

`make bench` once stopped at its sixth script on a changed helper signature and nobody saw it: the
figures an issue asks for are only as good as the scripts that print them. What the smoke pass
prints is not checked as a figure, only that each script ends with exit 0 and prints its lines.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = (ROOT / "Makefile").read_text()
BENCH_SCRIPTS = re.findall(r"\$\(PY\) (scripts/bench_\w+\.py)", MAKEFILE.split("\nbench:", 1)[1].split("\n\n", 1)[0])


def test_make_bench_runs_every_bench_script_in_the_folder():
    on_disk = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("bench_*.py") if p.name != "bench_size.py"
    )
    assert sorted(BENCH_SCRIPTS) == on_disk


# Runs the demo-multinode scenario itself: tests/test_local_gang.py runs that demo once and prints its story
# through the script's `report`, so a second sandbox here would prove nothing more.
RUN_BY_ANOTHER_TEST = {"scripts/bench_gang_local.py": "tests/test_local_gang.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", [s for s in BENCH_SCRIPTS if s not in RUN_BY_ANOTHER_TEST])
def test_bench_script_runs_to_the_end_at_its_smallest_size(script, tmp_path):
    env = {**os.environ, "BENCH_SMOKE": "1", "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "BENCH_SMOKE=1" in result.stdout, "the script did not take its smoke size"
    assert "Traceback" not in output, output[-3000:]
