"""The supervisor Lambda package: run records and decisions (the CLI imports it too)."""
