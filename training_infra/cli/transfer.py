"""`upload` and `fetch`: boto3's transfer manager (multipart, parallel) behind one progress bar.

Unchanged files are skipped by comparing the local file with the object's size and ETag. The
ETag is computed locally the way S3 computes it for the transfer manager's part size (MD5 for one
part, MD5 of the part MD5s plus `-N` otherwise), so a second `upload` of the same data moves
nothing and needs no extra request per file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import ChunksizeAdjuster

from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError
from training_infra.compute.agent.ti_agent.paths import UnsafePath, safe_join

TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024, max_concurrency=10
)


@dataclass
class SyncResult:
    transferred: int
    skipped: int
    bytes: int


class _Progress(BaseSubscriber):
    """Feeds the transfer manager's byte counts (from its worker threads) into one rich bar."""

    def __init__(self, progress: Progress, task: int) -> None:
        self._progress, self._task = progress, task

    def on_progress(self, future, bytes_transferred, **kwargs):  # noqa: ANN001 - s3transfer's signature
        self._progress.advance(self._task, bytes_transferred)


def _bar(console: Console) -> Progress:
    """The bar is drawn only on a terminal: piped or logged, a redrawn line is just noise cut at 80 columns."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console, transient=False, disable=not console.is_terminal,
    )  # fmt: skip


def s3_etag(path: Path, size: int, config: TransferConfig = TRANSFER_CONFIG) -> str:
    """The ETag S3 gives this file when the transfer manager uploads it with `config`."""
    if size < config.multipart_threshold:
        digest = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1024 * 1024), b""):
                digest.update(block)
        return f'"{digest.hexdigest()}"'
    part_size = ChunksizeAdjuster().adjust_chunksize(config.multipart_chunksize, size)
    parts = []
    with path.open("rb") as handle:
        for part in iter(lambda: handle.read(part_size), b""):
            parts.append(hashlib.md5(part, usedforsecurity=False).digest())
    return f'"{hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"'


def _local_files(source: Path) -> Iterator[tuple[Path, str]]:
    """(file, key suffix) for a file or every file under a directory, hidden files included."""
    if source.is_file():
        yield source, source.name
        return
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            yield path, path.relative_to(source).as_posix()


def remote_objects(aws: Aws, bucket: str, prefix: str) -> dict[str, tuple[int, str]]:
    paginator = aws.client("s3").get_paginator("list_objects_v2")
    return {
        obj["Key"]: (obj["Size"], obj.get("ETag", ""))
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
    }


def upload(aws: Aws, source: Path, bucket: str, prefix: str, console: Console) -> SyncResult:
    """Sync a file or directory to s3://bucket/prefix, skipping what is already there unchanged."""
    if not source.exists():
        raise CliError(f"nothing to upload: {source} does not exist")
    remote = remote_objects(aws, bucket, prefix)
    todo: list[tuple[Path, str, int]] = []
    skipped = 0
    for path, suffix in _local_files(source):
        key, size = prefix + suffix, path.stat().st_size
        known = remote.get(key)
        if known and known[0] == size and known[1] == s3_etag(path, size):
            skipped += 1
        else:
            todo.append((path, key, size))
    total = sum(size for _, _, size in todo)
    done, done_bytes = 0, 0
    try:
        with _bar(console) as progress, create_transfer_manager(aws.client("s3"), TRANSFER_CONFIG) as manager:
            task = progress.add_task(f"upload to s3://{bucket}/{prefix}", total=total)
            futures = [
                manager.upload(str(path), bucket, key, subscribers=[_Progress(progress, task)]) for path, key, _ in todo
            ]
            for future, (_, _, size) in zip(futures, todo, strict=True):
                future.result()
                done, done_bytes = done + 1, done_bytes + size
    except KeyboardInterrupt:
        raise UploadInterrupted(done, len(todo), done_bytes, total) from None
    return SyncResult(transferred=len(todo), skipped=skipped, bytes=total)


class UploadInterrupted(CliError):
    """Ctrl-C during an upload: what got there, and that running it again resumes."""

    exit_code = 130

    def __init__(self, done: int, files: int, done_bytes: int, total: int) -> None:
        super().__init__(
            f"interrupted: uploaded {done} of {files} file(s), {done_bytes:,} of {total:,} bytes; "
            "run the same upload again to resume (files already in the bucket are skipped)"
        )


def download(
    aws: Aws, bucket: str, prefix: str, objects: dict[str, tuple[int, str]], dest: Path, console: Console
) -> SyncResult:
    """Copy `objects` (the `remote_objects` listing of s3://bucket/prefix) into dest, keeping the layout
    below the prefix."""
    root = dest.resolve()
    plan: list[tuple[str, Path, int]] = []
    for key, (size, _) in sorted(objects.items()):
        if key.endswith("/"):
            continue  # folder markers
        try:
            # The agent's own rule: '..', absolute, NUL, '.'/'//' parts and symlinked folders are refused.
            target = safe_join(root, key[len(prefix) :])
        except UnsafePath as refusal:
            console.print(f"skipped s3://{bucket}/{key}: {refusal}; nothing written for it", markup=False)
            continue
        plan.append((key, target, size))
    total = sum(size for *_, size in plan)
    with _bar(console) as progress, create_transfer_manager(aws.client("s3"), TRANSFER_CONFIG) as manager:
        task = progress.add_task(f"fetch s3://{bucket}/{prefix}", total=total)
        futures = []
        for key, target, _ in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            futures.append(manager.download(bucket, key, str(target), subscribers=[_Progress(progress, task)]))
        for future in futures:
            future.result()
    return SyncResult(transferred=len(plan), skipped=0, bytes=total)
