"""One module per verb; `training_infra.cli.main` wires them into the `training-infra` command."""
