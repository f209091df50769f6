"""`training-infra schema`: the JSON Schema of run spec files (`launch -f`), for editors (cli/spec_cli.py)."""

from __future__ import annotations

from training_infra.cli import spec_cli
from training_infra.cli.errors import reported_errors

schema = reported_errors(spec_cli.schema)
