"""The sandbox's child processes, named so that a later process can end them safely.

Every child the sandbox starts (the moto server, the registry, each instance's agent) runs in a
session of its own (start_new_session), so a SIGKILLed sandbox leaves them running. `state.json`
records each one's process group with the identity of its leader (boot id and start time, as for the
sandbox itself); `local down` and the next `local up` end the groups still alive. A number the kernel
has since given to another process is never signalled: its identity differs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def process_identity(pid: int) -> str:
    """`<boot id>:<start time in clock ticks>`: unique to one process across pid reuse and reboots."""
    try:
        boot = BOOT_ID.read_text().strip()
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return ""
    return f"{boot}:{started}"


def _group_of(pid: int) -> tuple[int, str] | None:
    """(process group id, state letter) of a live process; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except (OSError, IndexError):
        return None
    return int(fields[2]), fields[0]


@dataclass(frozen=True)
class ChildProcess:
    """One process group the sandbox started: `name` says what it is (`moto`, `agent i-0abc`)."""

    name: str
    pgid: int
    identity: str

    @classmethod
    def of(cls, name: str, pid: int) -> ChildProcess:
        return cls(name, pid, process_identity(pid))

    @classmethod
    def load(cls, record: dict[str, Any]) -> ChildProcess:
        return cls(str(record["name"]), int(record["pgid"]), str(record["identity"]))

    def dump(self) -> dict[str, Any]:
        return asdict(self)

    def members(self) -> list[int]:
        """The live (not zombie) processes in the group."""
        found = []
        for entry in Path("/proc").iterdir():
            group = _group_of(int(entry.name)) if entry.name.isdigit() else None
            if group is not None and group[0] == self.pgid and group[1] != "Z":
                found.append(int(entry.name))
        return found

    def status(self) -> str:
        """`ours` (the recorded group lives), `gone`, or `reused` (its number now names another process)."""
        leader = _group_of(self.pgid)
        if leader is not None and leader[1] != "Z":
            if process_identity(self.pgid) != self.identity:
                return "reused"
            return "ours" if leader[0] == self.pgid else "reused"
        if not self.members():
            return "gone"
        # The leader is gone but its group lives on: Linux gives no new process a number that is still a live
        # group's id, so these are the recorded group's, unless the machine rebooted since.
        return "ours" if self.identity.split(":")[0] == BOOT_ID.read_text().strip() else "reused"

    def end(self, *, grace_seconds: float = 10) -> str:
        """SIGTERM to the group, SIGKILL after the grace; what was done, in a few words."""
        status = self.status()
        if status != "ours":
            return {"gone": "already gone", "reused": "not signalled: its pid now belongs to another process"}[status]
        try:
            os.killpg(self.pgid, signal.SIGTERM)
        except ProcessLookupError:
            return "already gone"
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and self.members():
            time.sleep(0.1)
        if self.members():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            return "killed (SIGKILL after SIGTERM)"
        return "stopped (SIGTERM)"


def end_all(children: list[ChildProcess], *, grace_seconds: float = 10) -> list[str]:
    """End every recorded group still alive, the last started first (agents before the moto server they upload
    to); one line for each that was not already gone."""
    lines = []
    for child in reversed(children):
        done = child.end(grace_seconds=grace_seconds)
        if done != "already gone":
            lines.append(f"{child.name} (process group {child.pgid}): {done}")
    return lines


def processes_with(variable: str, value: str, proc: Path = Path("/proc")) -> list[int]:
    """Every process whose environment holds `variable=value`: a played instance's processes by its TI_ROOT,
    those that left its agent's process group included (torchrun and its workers start their own sessions)."""
    wanted = f"{variable}={value}".encode()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def end_processes_with(variable: str, value: str) -> int:
    """SIGKILL to every process `processes_with` finds (an instance's power-off ends all of its processes)."""
    pids = processes_with(variable, value)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)
