"""The trainer's heartbeat, read safely, folded into the attempt's progress."""

from __future__ import annotations

import json
import math
import os
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path

HEARTBEAT_MAX_BYTES = 65536
# The trainer's named values kept from a beat's `metrics` (a sweep's objective and what it prunes on).
MAX_METRICS = 32
MAX_METRIC_NAME = 64


@dataclass(frozen=True)
class Beat:
    written_ns: int
    text: str


OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def read_heartbeat(path: Path) -> Beat | None:
    """At most 64 KB of the heartbeat file, opened only when it is a regular file, without blocking and
    without following a symlink. The trainer owns the folder and the agent is root: a FIFO (which would
    block, or feed the agent for ever), a device (opening /dev/watchdog arms it), a symlink to a host
    file or a folder is no beat, and is never opened; so is a huge (sparse) file beyond its first 64 KB.
    The file opened must be the one looked at (same device and inode), or it was swapped in between."""
    try:
        seen = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(seen.st_mode):
        return None
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != (seen.st_dev, seen.st_ino):
            return None
        data = os.read(fd, HEARTBEAT_MAX_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    return Beat(info.st_mtime_ns, data.decode("utf-8", "replace"))


@dataclass(frozen=True)
class Progress:
    """What the agent knows of the trainer's progress; `changed_epoch` None: never reported."""

    step: float | None = None
    steps_per_second: float | None = None
    changed_epoch: float | None = None
    written_ns: int | None = None
    said_not_json: bool = False
    metrics: dict[str, float] | None = None  # the last beat's `metrics`: name -> number (sweeps read them)

    @property
    def reported(self) -> bool:
        return self.changed_epoch is not None

    def record(self) -> dict | None:
        """What status.json and progress.json say: null when the trainer never reported progress."""
        if self.changed_epoch is None:
            return None
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.changed_epoch))
        record = {"step": self.step, "steps_per_second": self.steps_per_second, "changed_at": at}
        if self.metrics is not None:
            record["metrics"] = self.metrics
        return record


def _step(text: str) -> tuple[float | None, bool]:
    """The beat's numeric `step` (None: a touch), and whether the text was not JSON."""
    if not text.strip():
        return None, False
    try:
        beat = json.loads(text)
    except ValueError:
        return None, True
    step = beat.get("step") if isinstance(beat, dict) else None
    if isinstance(step, (int, float)) and not isinstance(step, bool):
        return step, False
    return None, False


def _metrics(text: str) -> dict[str, float] | None:
    """The beat's `metrics` object, numbers only (at most MAX_METRICS, short names): None when it has none."""
    try:
        beat = json.loads(text)
    except ValueError:
        return None
    found = beat.get("metrics") if isinstance(beat, dict) else None
    if not isinstance(found, dict):
        return None
    kept = {
        name: value
        for name, value in found.items()
        if isinstance(name, str) and 0 < len(name) <= MAX_METRIC_NAME
        and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }  # fmt: skip
    return dict(sorted(kept.items())[:MAX_METRICS])


def observe(progress: Progress, beat: Beat | None, now: float, *, since: float) -> tuple[Progress, str]:
    """Fold one look at the heartbeat into the progress; the second value is a line to log once, or "".

    A JSON object with a numeric `step` is progress when the step changes; any other content (a
    touch, other keys, text that is not JSON) when the file is written again; its time is the file's
    modification time. A file last written before `since` (the trainer's start) is no beat.
    """
    if beat is None or beat.written_ns < since * 1e9:
        return progress, ""
    step, not_json = _step(beat.text)
    said = ""
    if not_json and not progress.said_not_json:
        said = "is not JSON: counted as a touch (said once)"
        progress = replace(progress, said_not_json=True)
    progressed = progress.step != step if step is not None else progress.written_ns != beat.written_ns
    if progressed or progress.changed_epoch is None:
        at = min(beat.written_ns / 1e9, now)  # when the trainer wrote it, not when the agent looked
        rate = progress.steps_per_second
        previous = progress.changed_epoch
        if step is not None and progress.step is not None and previous is not None and at > previous:
            rate = round((step - progress.step) / (at - progress.changed_epoch), 3)
        progress = replace(progress, step=step, steps_per_second=rate if step is not None else None, changed_epoch=at)
    metrics = _metrics(beat.text) if step is not None else None
    if metrics is not None:
        progress = replace(progress, metrics=metrics)
    return replace(progress, written_ns=beat.written_ns), said
