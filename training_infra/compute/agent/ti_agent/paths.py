"""Paths that come from outside (S3 keys, manifest names, the trainer) checked by construction.

Standard library only: the agent on the box and the CLI's `fetch` import the same function.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path


class UnsafePath(ValueError):
    """A name that would leave its root: the message names it, nothing was written."""


def safe_join(root: Path | str, name: str) -> Path:
    """`root/name` when `name` is a plain relative path that stays inside `root`; else UnsafePath.

    Refused: empty names, NUL, absolute paths, `..` anywhere, `.` or empty components (`a//b`,
    `./a`: two spellings of one file), backslashes (a Windows separator on a POSIX box is a
    spelling trick, not a name), and any existing component under `root` that is a symlink (a
    link planted earlier would carry the write elsewhere). `root` itself is trusted as given.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePath(f"{name!r} is not a file name")
    if "\x00" in name:
        raise UnsafePath(f"{name!r} has a NUL byte")
    if "\\" in name:
        raise UnsafePath(f"{name!r} has a backslash")
    if name.startswith("/"):
        raise UnsafePath(f"{name!r} is an absolute path")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(f"{name!r} leaves its folder or is not in normal form ('..', '.', '//')")
    if posixpath.normpath(name) != name:
        raise UnsafePath(f"{name!r} is not in normal form")
    base = Path(root)
    current = base
    for part in parts:
        current = current / part
        if os.path.islink(current):
            raise UnsafePath(f"{name!r} goes through the symlink {current}")
    return current


def is_safe(name: str) -> bool:
    """The name rule alone, without looking at a disk (for listings)."""
    try:
        safe_join("/nonexistent-root-for-the-rule", name)
    except UnsafePath:
        return False
    return True
