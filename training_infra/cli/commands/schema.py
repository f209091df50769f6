"""`training-infra schema`: the JSON Schema of run spec files (`launch -f`), for editors (cli/spec_cli.py)."""

from __future__ import annotations

from training_infra.cli.errors import reported_errors


@reported_errors
def schema() -> None:
    """Print the JSON Schema of run spec files (`launch -f`), for editors that complete and check them.

    VS Code (the YAML extension): `training-infra schema > run-spec.schema.json` and put
    `# yaml-language-server: $schema=./run-spec.schema.json` on the first line of run.yaml.
    """
    import sys

    from training_infra.cli import spec_cli  # pydantic and the launch path: only for this verb, not --help

    sys.stdout.write(spec_cli.schema_text() + "\n")
