"""Checkpoints: the manifest of S3 versions, the upload that only a whole set may commit, the exact restore.

Rules kept from agent.sh (each was learnt the hard way; see the git log of issue 12 and after):
- S3 mirrors /checkpoints, without *.tmp (trainers write there, then rename), without a heartbeat
  kept there (an old beat restored would look like progress), never following symlinks.
- One sync at a time (the periodic, the rebalance and the final sync share one lock).
- Upload first, deleting nothing; then `_manifest.json` names the files that upload carried with
  the S3 version it made of each, and only then are the objects the trainer no longer keeps deleted.
- A file rewritten or deleted under the upload (half a sharded save) keeps the previous manifest
  and deletes nothing; 3 in a row gets a note telling the user to save under a new name.
- A file rotated away between the CLI's listing and its read is not a failed sync.
- The manifest is sent only when its files changed (each upload is another version to list).
- A restore takes exactly the manifest's versions: by name where S3's newest is the recorded one
  (one parallel `aws s3 sync`), by version id otherwise; a recorded version that is gone fails the
  attempt in one line, since newer objects could mix two saves.
- Every name from S3 is checked by `paths.safe_join` before anything is written.
- After a spot notice no write reaches the run's checkpoint prefix past the handover deadline (`cut_off_at`,
  the notice's action time on this instance's clock): a replacement started on the notice restores once that
  deadline (plus a margin) passed. A CLI call still running then is ended; the manifest then still names the
  last complete set, so an upload cut in half is never restored.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .aws import Aws, CliResult
from .paths import UnsafePath, safe_join

MANIFEST = "_manifest.json"


class AttemptFailed(Exception):
    """Ends the attempt as failed with this one-line message."""


@dataclass(frozen=True)
class Version:
    version_id: str
    etag: str
    size: int

    def as_json(self) -> dict:
        return {"version_id": self.version_id, "etag": self.etag, "size": self.size}


FileMeta = tuple[int, int]  # size, mtime_ns


def checkpoint_files(folder: Path, skip: str = "") -> dict[str, FileMeta]:
    """What a sync uploads: regular files (no symlinks), not *.tmp, not the manifest, not `skip`.

    The trainer rotates folders while this walks: a folder or file gone under it is simply not there
    (os.walk skips what it cannot list; lstat's FileNotFoundError skips the file)."""
    found = {}
    for top, folders, files in os.walk(folder):
        folders.sort()
        for file in files:
            path = os.path.join(top, file)
            name = Path(path).relative_to(folder).as_posix()
            if name.endswith(".tmp") or name in (MANIFEST, skip):
                continue
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                found[name] = (info.st_size, info.st_mtime_ns)
    return dict(sorted(found.items()))


def _own_children() -> list[int]:
    me = os.getpid()
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(me):
            children.append(int(entry.name))
    return children


def latest_versions(listing: object, prefix: str) -> dict[str, Version]:
    """The newest version of each object under `prefix` from `list-object-versions --query
    'Versions[?IsLatest].[Key,VersionId,ETag,Size]'` (null when there are none)."""
    versions = {}
    for key, version_id, etag, size in listing or []:
        if key.startswith(prefix) and key != prefix + MANIFEST:
            versions[key[len(prefix) :]] = Version(version_id, etag, size)
    return versions


@dataclass(frozen=True)
class Manifest:
    files: dict[str, Version]
    written_at: str

    def as_json(self) -> dict:
        return {"files": {name: v.as_json() for name, v in self.files.items()}, "written_at": self.written_at}


def commit_manifest(
    folder: Path, snapshot: dict[str, FileMeta], latest: dict[str, Version], now: float, skip: str = ""
) -> tuple[Manifest | None, list[str]]:
    """The set a finished upload carried, by the S3 version it made of each file; or None and the files
    that moved under it. The second value otherwise: objects neither in the manifest nor on disk,
    which are deleted only after this manifest is in S3."""
    current = checkpoint_files(folder, skip)
    moved = sorted(
        name
        for name, meta in snapshot.items()
        if (name in current and current[name] != meta) or (latest[name].size if name in latest else None) != meta[0]
    )
    if moved:
        return None, moved
    files = {name: latest[name] for name in snapshot}
    stale = sorted(name for name in latest if name not in files and name not in current)
    return Manifest(files, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))), stale


def glob_escaped(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def restore_plan(recorded: dict[str, object], latest: dict[str, Version]) -> tuple[list[str], list[tuple[str, str]]]:
    """Names whose newest S3 version is the recorded one (taken by one sync), and (name, version id) for
    the rest. A manifest from before versions were recorded (name -> size) takes its files by name."""
    by_name, by_version = [], []
    for name, version in sorted(recorded.items()):
        if not isinstance(version, dict) or (latest[name].version_id if name in latest else None) == version.get(
            "version_id"
        ):
            by_name.append(name)
        else:
            by_version.append((name, str(version["version_id"])))
    return by_name, by_version


def include_filters(names: list[str]) -> list[str]:
    return ["--exclude", "*", *(arg for name in names for arg in ("--include", glob_escaped(name)))]


def delete_batches(prefix: str, names: list[str]) -> list[dict]:
    """`s3api delete-objects --delete` bodies, 1,000 keys each (the API's limit)."""
    keys = [{"Key": prefix + name} for name in names]
    return [{"Objects": keys[i : i + 1000], "Quiet": True} for i in range(0, len(keys), 1000)]


@dataclass
class SyncState:
    kept_in_a_row: int = 0
    complete_as_of: float | None = None  # the snapshot time of the last complete sync
    last_sync_seconds: float = 0
    sent: dict | None = None  # the files of the manifest last sent


class RunCheckpointPaths:
    """Where a run's checkpoints live in the outputs bucket: one prefix for every attempt and node."""

    bucket: str
    run_id: str

    @property
    def key_prefix(self) -> str:
        return f"checkpoints/{self.run_id}/"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/checkpoints/{self.run_id}"


@dataclass
class Checkpoints(RunCheckpointPaths):
    aws: Aws
    folder: Path
    state_dir: Path
    bucket: str
    run_id: str
    skip: str  # the heartbeat's name when it lives under /checkpoints
    log: object  # (str) -> None
    note: object  # (str) -> None
    state: SyncState = field(default_factory=SyncState)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    cut_off_at: float | None = None  # epoch (instance clock): no checkpoint write after it (the handover deadline)
    cut_off_why: str = ""
    cut_off_said: bool = False
    clock: object = time.time  # () -> float

    def cut_off(self, at: float, why: str) -> None:
        """No checkpoint write after `at` (the earliest deadline given wins): the handover to a replacement."""
        if self.cut_off_at is None or at < self.cut_off_at:
            self.cut_off_at, self.cut_off_why = at, why

    def _left(self) -> float | None:
        """Seconds a write may still take (None: no deadline); at or past it, said once in one log line."""
        if self.cut_off_at is None:
            return None
        left = self.cut_off_at - self.clock()  # type: ignore[operator]
        if left <= 0 and not self.cut_off_said:
            self.cut_off_said = True
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.cut_off_at))
            self.log(f"checkpoint upload stopped at the handover deadline {at} ({self.cut_off_why}): the replacement "
                     "restores from here on; S3 keeps the last complete checkpoint")  # fmt: skip
        return left

    def past_cut_off(self) -> bool:
        left = self._left()
        return left is not None and left <= 0

    def _write(self, *args: str):  # noqa: ANN202 - a CliResult
        """An AWS CLI call that writes the run's checkpoints, ended at the handover deadline."""
        left = self._left()
        if left is not None and left <= 0:
            return CliResult(124, "", "past the handover deadline: not sent")
        done = self.aws.cli(*args, timeout=left)
        if left is not None and not done.ok:
            self._left()  # says the cut-off when the call was ended by it
        return done

    def versions(self) -> dict[str, Version]:
        listed = self.aws.cli(
            "s3api", "list-object-versions", "--bucket", self.bucket, "--prefix", self.key_prefix,
            "--output", "json", "--query", "Versions[?IsLatest].[Key,VersionId,ETag,Size]",
        )  # fmt: skip
        if not listed.ok:
            raise OSError(listed.stderr)
        return latest_versions(json.loads(listed.stdout or "null"), self.key_prefix)

    # ------------------------------------------------------------ upload
    def sync(self) -> bool:
        with self._lock:
            return self._upload()

    def end_in_flight(self) -> int:
        """End a periodic or rebalance sync's AWS CLI calls (as agent.sh's finalize killed an in-flight
        rebalance sync): the final sync must not queue behind minutes of retries in a 120 s spot window.
        Only this process's own children whose arguments name this run's checkpoints; their sync then
        fails and frees the lock. Answers how many were ended."""
        if not self._lock.locked():
            return 0
        ended = 0
        for pid in _own_children():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(self.url.encode() in arg or self.key_prefix.encode() in arg for arg in argv):
                try:
                    os.kill(pid, signal.SIGTERM)
                    ended += 1
                except OSError:
                    continue
        return ended

    def _upload(self) -> bool:
        if self.past_cut_off():
            return False
        began, snapshot_at = time.monotonic(), time.time()
        snapshot = checkpoint_files(self.folder, self.skip)
        skip = ["--exclude", self.skip] if self.skip else []
        sent = self._write(
            "s3", "sync", f"{self.folder}/", f"{self.url}/", "--exclude", "*.tmp", "--exclude", MANIFEST, *skip,
            "--no-follow-symlinks", "--only-show-errors",
        )  # fmt: skip
        if not sent.ok:
            # A checkpoint the trainer rotated away between the CLI's listing and its read is gone, not a failure.
            errors = [
                line
                for line in (sent.stderr + "\n" + sent.stdout).splitlines()
                if line.strip() and "No such file or directory" not in line and "File does not exist" not in line
            ]
            if errors:
                self.log("\n".join(errors))
                return False
        try:
            latest = self.versions()
        except OSError as error:
            self.log(str(error))
            return False
        manifest, names = commit_manifest(self.folder, snapshot, latest, time.time(), self.skip)
        self.state.last_sync_seconds = time.monotonic() - began
        if manifest is None:
            self.state.kept_in_a_row += 1
            named = " ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            self.log(f"checkpoint files changed during the upload ({named}): the manifest keeps the last complete set")
            if self.state.kept_in_a_row == 3:
                self.note(
                    f"WARNING: for 3 syncs in a row the trainer rewrote checkpoint files while they uploaded ({named}),"
                    " so S3's last complete checkpoint is getting old: save to a new name or *.tmp, then rename"
                )
            return True
        self.state.kept_in_a_row = 0
        document = manifest.as_json()
        if self.state.sent is None or self.state.sent != document["files"]:
            local = self.state_dir / MANIFEST
            local.write_text(json.dumps(document, indent=1) + "\n")
            copied = self._write("s3", "cp", str(local), f"{self.url}/{MANIFEST}", "--only-show-errors")
            if not copied.ok:
                self.log(copied.stderr)
                return False
            self.state.sent = document["files"]
        self.state.complete_as_of = snapshot_at  # S3's manifest now names every checkpoint the trainer had then
        for number, batch in enumerate(delete_batches(self.key_prefix, names)):
            if self.past_cut_off():  # the objects stay: the next attempt's first sync deletes them
                break
            path = self.state_dir / f"ckpt.delete.{number}.json"
            path.write_text(json.dumps(batch))
            # Quiet: only the keys that failed come back (exit 0 even then).
            failed = self._write(
                "s3api", "delete-objects", "--bucket", self.bucket, "--delete", f"file://{path}",
                "--output", "text", "--query", "length(Errors || `[]`)",
            )  # fmt: skip
            if not failed.ok or failed.stdout.strip() != "0":
                why = failed.stdout.strip() or failed.stderr
                self.log(
                    "WARNING: checkpoints the trainer no longer keeps were not deleted from S3 "
                    f"({why}); the next sync tries again"
                )
        return True

    # ------------------------------------------------------------ restore
    def restore(self) -> None:
        """The last complete sync's set into the folder; a run from before manifests: every object.
        Raises AttemptFailed (no retry helps) or OSError (a retry may)."""
        local = self.state_dir / "restored-manifest.json"
        got = self.aws.cli("s3", "cp", f"{self.url}/{MANIFEST}", str(local), "--only-show-errors")
        latest = self.versions()
        if got.ok:
            try:
                recorded = json.loads(local.read_text())["files"]
                assert isinstance(recorded, dict)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise AttemptFailed(f"checkpoint manifest {self.url}/{MANIFEST} is not a manifest") from None
            for name in recorded:
                try:
                    safe_join(self.folder, name)
                except UnsafePath as error:
                    self.log(f"refused checkpoint key {self.key_prefix}{name!r}: {error}")
                    raise AttemptFailed(
                        f"checkpoint manifest names {name!r}, which is not a file under {self.folder}: nothing restored"
                        f" (the manifest was written by something other than the agent; delete {self.url}/{MANIFEST}"
                        " to start without it)"
                    ) from None
            by_name, by_version = restore_plan(recorded, latest)
            if not recorded:
                left = len(set(latest) - set(recorded))
                self.note(
                    "WARNING: the checkpoint manifest names no files (the trainer kept none at the last complete sync;"
                    f" {left} other objects in {self.url}/): starting without a checkpoint"
                )
            for name, version in by_version:
                target = safe_join(self.folder, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                safe_join(self.folder, name)  # the folders just made are no links either
                fetched = self.aws.cli(
                    "s3api", "get-object", "--bucket", self.bucket, "--key", self.key_prefix + name,
                    "--version-id", version, str(target),
                )  # fmt: skip
                if not fetched.ok:
                    if "NoSuchVersion" in fetched.stderr:
                        raise AttemptFailed(
                            f"checkpoint {name}: the version the last complete sync recorded is gone (replaced versions"
                            " under checkpoints/ expire after 1 day), and the newer objects may mix two saves; to"
                            f" resume from them anyway, delete {self.url}/{MANIFEST} and relaunch"
                        )
                    raise OSError(fetched.stderr)
            cut = f" ({len(by_version)} by their recorded version: a later upload was cut short)" if by_version else ""
            self.log(
                f"checkpoint manifest: restoring {len(by_name) + len(by_version)} files of the last complete sync{cut}"
            )
            filters = include_filters(by_name)
        else:
            self.log("no checkpoint manifest (none, or a run from before manifests): every object")
            safe = []
            for name in sorted(latest):
                try:
                    safe_join(self.folder, name)
                    safe.append(name)
                except UnsafePath as error:
                    self.log(f"refused checkpoint key {self.key_prefix}{name!r}: {error}; not restored")
            # Always the checked names: a key put after the listing must not ride along on a wildcard.
            filters = include_filters(safe)
            if not safe:
                return
        if filters == ["--exclude", "*"]:
            return
        synced = self.aws.cli(
            "s3", "sync", f"{self.url}/", f"{self.folder}/", "--exclude", MANIFEST, *filters, "--only-show-errors"
        )
        if not synced.ok:
            raise OSError(synced.stderr)

    # ------------------------------------------------------------ freshness
    def newest_local(self) -> float | None:
        times = [meta[1] / 1e9 for meta in checkpoint_files(self.folder, self.skip).values()]
        return max(times) if times else None
