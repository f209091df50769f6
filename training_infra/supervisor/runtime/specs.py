"""The run spec a launch was asked with (`launch -f`, docs/cli.md "Run specs"), kept with the run: in its record
and at runs/<id>/spec.yaml in the outputs bucket, so `launch --like RUN` can start a copy and `fetch` brings it.

The CLI renders the spec (training_infra/spec.py); here it is text the user wrote about their own run, never
trusted for anything the run may do: the request's checked fields decide that. Only its size and that it is
text are checked. Stdlib and boto3 only (this folder is the Lambda package).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger()

MAX_SPEC_BYTES = 16 * 1024  # a DynamoDB item holds 400 KB; a spec is a few hundred bytes
SPEC_FILE = "spec.yaml"


class SpecRefused(ValueError):
    """The request's spec_yaml is not text of at most MAX_SPEC_BYTES."""


def spec_text(event: Mapping[str, Any]) -> str:
    value = event.get("spec_yaml") or ""
    if not isinstance(value, str) or len(value.encode()) > MAX_SPEC_BYTES:
        shown = f"{len(value.encode())} bytes" if isinstance(value, str) else type(value).__name__
        raise SpecRefused(f"request field 'spec_yaml': got {shown}; allowed: text of at most {MAX_SPEC_BYTES} bytes")
    return value


def spec_key(runs_prefix: str, run_id: str) -> str:
    return f"{runs_prefix}{run_id}/{SPEC_FILE}"


def keep(s3: Any, bucket: str, runs_prefix: str, run_id: str, text: str) -> bool:
    """runs/<id>/spec.yaml; the record holds the same text, so a failed write is logged, never the launch's end."""
    if not text:
        return False
    try:
        s3.put_object(
            Bucket=bucket, Key=spec_key(runs_prefix, run_id), Body=text.encode(), ContentType="application/yaml"
        )
    except (ClientError, BotoCoreError) as error:
        log.warning("could not write %s: %s", spec_key(runs_prefix, run_id), error)
        return False
    return True
