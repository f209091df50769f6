"""Where build-time work is kept between processes: $XDG_CACHE_HOME/training-infra, else ~/.cache/training-infra.

Everything kept here is keyed by what it was made from, so a stale entry is never used, only left behind;
a folder that cannot be written is no cache (the work is done again), never an error.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "training-infra"
