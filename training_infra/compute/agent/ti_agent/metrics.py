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
import time
from dataclasses import dataclass
from pathlib import Path

from .progress import Progress

MAX_FIELDS = 32  # a heartbeat is small; a huge one must not make the history huge
MAX_KEY_CHARS = 64
RESERVED = ("t", "step", "steps_per_second", "gpu_percent")


def numeric_fields(text: str) -> dict[str, float]:
    """The heartbeat's top-level numbers (not booleans, not NaN or infinity), at most MAX_FIELDS."""
    try:
        beat = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(beat, dict):
        return {}
    found: dict[str, float] = {}
    for key, value in beat.items():
        if len(found) >= MAX_FIELDS:
            break
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and isinstance(key, str)
            and 0 < len(key) <= MAX_KEY_CHARS
            and key not in RESERVED
        ):
            found[key] = value
    return found


@dataclass
class MetricsLog:
    """Appends the history; never raises (a full disk costs the history, not the run)."""

    path: Path
    every: float = 10.0
    written_at: float = -math.inf
    last_change: float | None = None
    failed: bool = False

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
            **numeric_fields(text),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(line, separators=(",", ":")) + "\n")
        except OSError:
            self.failed = True
            return False
        self.written_at, self.last_change = now, changed
        return True
