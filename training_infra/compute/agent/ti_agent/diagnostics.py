"""What a stalled trainer was doing, into logs/training-diagnostics.txt, before it is stopped.

Bounded: a hung GPU can hang nvidia-smi too, and the stop must still come (20 s per tool, 2 min of
py-spy in all).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import deque
from pathlib import Path


def _run(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603
    except subprocess.TimeoutExpired:
        return f"({argv[0]} hung: cut after {timeout:.0f}s)\n"
    except OSError:
        return ""
    if done.returncode != 0 and not done.stdout:
        return done.stderr
    return done.stdout + done.stderr


def collect(*, out: Path, nvidia_smi: str, pids: list[int] | None, train_log: Path, env_path: str) -> str:
    """Write the diagnostics; return the training-log note that says what they hold."""
    py_spy = shutil.which("py-spy", path=env_path)
    until = time.monotonic() + 120
    parts = [f"== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} process tree\n"]
    parts.append(_run(["ps", "-eo", "pid,ppid,pgid,stat,etime,pcpu,rss,args", "--forest"], 20))
    parts.append(f"== {nvidia_smi}\n")
    smi = _run([nvidia_smi], 20)
    parts.append(smi if smi.strip() else f"({nvidia_smi} not available or hung)\n")
    if pids is None:
        parts.append("== the container's processes were not found: no Python stacks\n")
    elif py_spy:
        for pid in pids:
            if time.monotonic() >= until:
                parts.append("== py-spy: 2 min spent, the other processes left out\n")
                break
            parts.append(f"== py-spy dump --pid {pid}\n")
            parts.append(_run([py_spy, "dump", "--pid", str(pid)], 20))
    else:
        parts.append("== py-spy is not installed: no Python stacks\n")
    parts.append("== the trainer's last 200 log lines\n")
    with open(train_log, "rb") as handle:
        parts.append(b"".join(deque(handle, maxlen=200)).decode(errors="replace"))
    out.write_text("".join(part if part.endswith("\n") or not part else part + "\n" for part in parts))
    tools = "py-spy stacks" if py_spy else "no py-spy on this box"
    return f"stall diagnostics (process tree, {nvidia_smi}, {tools}, last 200 lines) in logs/training-diagnostics.txt"
