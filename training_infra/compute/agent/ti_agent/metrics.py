"""The attempt's time series for `training-infra watch` (docs/agent.md, "Metrics history").

One JSON line per change of the trainer's heartbeat, at most one every `every` seconds, appended to
`metrics.jsonl` in the attempt's logs folder: the log upload that already runs (with each periodic
checkpoint sync and at the end) carries it to `runs/<id>/attempts/<n>/logs/metrics.jsonl`, so the
history costs no request of its own. A line: the time the trainer wrote the beat, its step and
steps/s, the busiest GPU's use, and every numeric field of the heartbeat JSON (loss, accuracy ...).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .progress import Progress

MAX_FIELDS = 32  # a heartbeat is small; a huge one must not make the history huge
MAX_KEY_CHARS = 64
RESERVED = ("t", "step", "steps_per_second", "gpu_percent")
# A metric's name is printed as a chart title on the user's terminal: the trainer (any code in its
# container) chooses it, so only names such as `loss`, `val/acc` or `lr-0.1` are kept; an escape
# sequence or a bidi control in a name never reaches the history.
SAFE_KEY = re.compile(rf"[A-Za-z0-9_./-]{{1,{MAX_KEY_CHARS}}}")


def split_fields(text: str) -> tuple[dict[str, float], list[str]]:
    """(the heartbeat's top-level numbers under a safe name, at most MAX_FIELDS; the numbers' names dropped
    as unsafe). Not booleans, not NaN or infinity."""
    try:
        beat = json.loads(text)
    except ValueError:
        return {}, []
    if not isinstance(beat, dict):
        return {}, []
    found: dict[str, float] = {}
    dropped: list[str] = []
    for key, value in beat.items():
        if len(found) >= MAX_FIELDS:
            break
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        if key in RESERVED:
            continue
        if SAFE_KEY.fullmatch(key):
            found[key] = value
        else:
            dropped.append(key)
    return found, dropped


def numeric_fields(text: str) -> dict[str, float]:
    """The heartbeat's numbers under a safe name (split_fields without the dropped names)."""
    return split_fields(text)[0]


@dataclass
class MetricsLog:
    """Appends the history; never raises (a full disk costs the history, not the run)."""

    path: Path
    every: float = 10.0
    written_at: float = -math.inf
    last_change: float | None = None
    failed: bool = False
    log: Callable[[str], None] | None = None  # the agent's setup log: says once that names were dropped
    warned: bool = False

    def record(self, progress: Progress, text: str, now: float, gpu_percent: float | None) -> bool:
        """Append a line when the progress changed since the last one and `every` has passed."""
        changed = progress.changed_epoch
        if changed is None or changed == self.last_change or now - self.written_at < self.every:
            return False
        line = {
            "t": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(changed)),
            "step": progress.step,
            "steps_per_second": progress.steps_per_second,
            "gpu_percent": gpu_percent,
        }
        fields, dropped = split_fields(text)
        line.update(fields)
        if dropped and not self.warned and self.log is not None:
            self.warned = True  # one line per attempt, not one per beat
            shown = ", ".join(ascii(key)[:80] for key in dropped[:3])  # ascii(): no control character printed
            self.log(f"metrics history: dropped {len(dropped)} heartbeat name(s) outside {SAFE_KEY.pattern}: {shown}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(line, separators=(",", ":")) + "\n")
        except OSError:
            self.failed = True
            return False
        self.written_at, self.last_change = now, changed
        return True
