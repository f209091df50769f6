"""What runs on the instance: `ti_agent` and a vendored botocore, a tar.xz the user-data bootstrap unpacks and runs."""
