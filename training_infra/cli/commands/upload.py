"""`training-infra upload`: a local dataset to the data bucket."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from training_infra import naming
from training_infra.cli.aws import Aws
from training_infra.cli.errors import UsageError, err_console, reported_errors
from training_infra.cli.options import Region
from training_infra.cli.render import stdout


@reported_errors
def upload(
    path: Annotated[
        Path, typer.Argument(help="A dataset directory (or one file) on this machine.", show_default=False)
    ],
    region: Region = None,
) -> None:
    """Sync a local dataset to the data bucket's `data/` prefix (what the instance mounts at /data).

    Multipart and parallel; files already in the bucket with the same content are skipped, so
    running it again after changing a few files uploads only those.
    """
    from training_infra.cli import transfer

    if not path.exists():
        raise UsageError(f"argument 'PATH': got {str(path)!r}; allowed: an existing file or directory")
    if path.is_dir() and not any(found.is_file() for found in path.rglob("*")):
        raise UsageError(
            f"argument 'PATH': got {str(path)!r}; allowed: a file, or a folder with files in it (it is empty)"
        )
    aws = Aws(region)
    bucket = aws.output(naming.OUTPUT_TRAINING_BUCKET)
    result = transfer.upload(aws, path, bucket, naming.DATA_PREFIX, err_console())
    stdout().print(
        f"uploaded {result.transferred} file(s), {result.bytes:,} bytes; skipped {result.skipped} unchanged "
        f"-> s3://{bucket}/{naming.DATA_PREFIX}",
        markup=False,
    )
