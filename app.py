#!/usr/bin/env python3
"""Builds the app from settings: parse once, wire stacks, nothing else."""

import sys

from training_infra.config import ConfigError, parse_settings
from training_infra.stacks import build_app, new_app


def main() -> None:
    app = new_app()
    try:
        settings = parse_settings(app.node.get_all_context())
    except ConfigError as error:
        print(f"training-infra: {error}", file=sys.stderr)
        sys.exit(2)
    build_app(settings, app=app)
    app.synth()


if __name__ == "__main__":
    main()
