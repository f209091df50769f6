"""The run's secrets and the trainer role: AWS access for the trainer, never the instance role's.

Secret values live only in a 0600 file under the agent's state until the trainer has started, then
in its environment: never in user data, a log or status.json; errors name the reference, not the
value. They are read with a short session of the secrets reader role whose session policy names
only the references in TI_SECRETS. The trainer role's session is credential_process JSON behind an
AWS config file: SDKs run `cat` again before its Expiration, so a renewed session reaches a trainer
that runs for days (a credentials file is read once).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .aws import Aws
from .checkpoints import AttemptFailed


def secrets_policy(lines: list[str], *, role_arn: str, region: str) -> dict:
    """The secrets reader role's session policy: exactly the parameters and secrets TI_SECRETS names
    (`NAME=ssm:/path`, `NAME=arn:...:secretsmanager:...`), and KMS only through those two services.

    A Secrets Manager ARN may be partial (the name without AWS's 6-character suffix): `-??????`
    matches its full ARN, and no other secret's; a full ARN (ending in `-` and 6 characters) is
    named as it is. STS refuses a session policy over 2,048 characters: `launch` checks the size
    with the same function before anything starts.
    """
    partition, account = role_arn.split(":")[1::3]
    refs = [line.partition("=")[2] for line in lines]
    parameter = f"arn:{partition}:ssm:{region}:{account}:parameter/"

    def secret_arns(ref: str) -> list[str]:
        full = len(ref) > 7 and ref[-7] == "-" and ref[-6:].isalnum()
        return [ref] if full else [ref, ref + "-??????"]

    resources = {
        "ssm:GetParameter": [parameter + r[5:] for r in refs if r[:4] == "ssm:"],
        "secretsmanager:GetSecretValue": [x for r in refs if r[:4] == "arn:" for x in secret_arns(r)],
    }
    statements = [{"Effect": "Allow", "Action": k, "Resource": v} for k, v in resources.items() if v]
    suffix = "amazonaws.com.cn" if partition == "aws-cn" else "amazonaws.com"
    via = [f"{service}.{region}.{suffix}" for service in ("ssm", "secretsmanager")]
    condition = {"StringEquals": {"kms:ViaService": via}}
    keys = f"arn:{partition}:kms:{region}:{account}:key/*"
    statements.append({"Effect": "Allow", "Action": "kms:Decrypt", "Resource": keys, "Condition": condition})
    return {"Version": "2012-10-17", "Statement": statements}


def _private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def fetch_secrets(aws: Aws, lines: list[str], *, reader_role: str, run_id: str, out: Path, log) -> bool:
    """Write NAME=value lines to `out` (0600); False when a read failed (the AWS error is logged)."""
    _private(out, "")
    if not lines:
        return True
    policy = json.dumps(secrets_policy(lines, role_arn=reader_role, region=aws.region), separators=(",", ":"))
    assumed = aws.cli(
        "sts", "assume-role", "--role-arn", reader_role, "--role-session-name", f"ti-secrets-{run_id[:53]}",
        "--duration-seconds", "900", "--policy", policy, "--output", "json", "--query", "Credentials",
    )  # fmt: skip
    if not assumed.ok:
        log(assumed.stderr)
        return False
    keys = json.loads(assumed.stdout)
    reader = {
        "AWS_ACCESS_KEY_ID": keys["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": keys["SecretAccessKey"],
        "AWS_SESSION_TOKEN": keys["SessionToken"],
    }
    found = []
    for line in lines:
        name, ref = line.split("=", 1)
        if ref.startswith("ssm:"):
            args = ["ssm", "get-parameter", "--name", ref[4:], "--with-decryption", "--query", "Parameter.Value"]
        else:
            args = ["secretsmanager", "get-secret-value", "--secret-id", ref, "--query", "SecretString"]
        got = aws.cli(*args, "--output", "text", env=reader)
        if not got.ok:
            log(got.stderr)
            return False
        value = got.stdout[:-1] if got.stdout.endswith("\n") else got.stdout
        # A second line would be read by `docker --env-file` as a variable to copy from the agent's environment.
        if "\n" in value:
            raise AttemptFailed(f"secret {ref} has more than one line")
        found.append(f"{name}={value}\n")
    _private(out, "".join(found))
    return True


def assume_trainer_role(aws: Aws, *, role_arn: str, run_id: str, seconds: int, aws_dir: Path, log) -> bool:
    """The trainer role's session as credential_process JSON, written beside and renamed (the container,
    which mounts the folder, never reads half a file)."""
    aws_dir.mkdir(parents=True, exist_ok=True)
    assumed = aws.cli(
        "sts", "assume-role", "--role-arn", role_arn, "--role-session-name", f"ti-{run_id[:61]}",
        "--duration-seconds", str(seconds), "--tags", f"Key=training-infra:run-id,Value={run_id}",
        "--output", "json", "--query", "merge({Version: `1`}, Credentials)",
    )  # fmt: skip
    if not assumed.ok:
        log(assumed.stderr)
        return False
    fresh = aws_dir / "session.new"
    _private(fresh, assumed.stdout)
    fresh.replace(aws_dir / "session.json")
    log("trainer role session written")
    return True


def trainer_aws_config(aws_dir: Path, seen_as: str) -> None:
    """The config file the trainer's SDKs read; `seen_as` is `aws_dir` as the trainer sees it."""
    (aws_dir / "config").write_text(f"[default]\ncredential_process = cat '{seen_as}/session.json'\n")
