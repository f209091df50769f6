"""What the trainer can reach on the box, and what it can make the agent do (issue 15).

The real agent against moto (SSM, Secrets Manager, STS and S3 answer as AWS does): uploads do not
follow the trainer's symlinks, a rejected run id never becomes an S3 key, secrets reach the trainer
and nothing else, the container gets AWS credentials only from the opt-in trainer role, and it runs
with `no-new-privileges` and a sized /dev/shm instead of the host's IPC namespace.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from training_infra.compute.agent.ti_agent.secrets import trainer_aws_config

pytestmark = pytest.mark.slow

ACCOUNT = "123456789012"  # moto's account
HF_TOKEN = "hf_s3cr3t-value-0123456789"  # noqa: S105 - a test value, and what must never leak
WANDB_KEY = "wandb-key 42 with spaces"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def everything_uploaded(run) -> str:
    """Every object the run left in S3 plus the box's own logs, as one text to search."""
    texts = [run.read(key) for key in run.keys(prefix="")]
    return "\n".join([*texts, run.setup_log, run.training_log])


def recording_aws(run, services: tuple[str, ...] = ("sts",)) -> Path:
    """The real AWS CLI behind a script that records the arguments of calls to `services` and the
    access key each call signs with (from its environment; empty: the instance's own)."""
    real = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")
    wrapper_dir = run.tmp / "aws-wrapper"
    wrapper_dir.mkdir()
    calls = run.tmp / "aws-calls.jsonl"
    wrapper = wrapper_dir / "aws"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "args = sys.argv[1:]\n"
        "args = args[2:] if args[:1] == ['--cli-connect-timeout'] else args\n"
        f"if args and args[0] in {list(services)!r}:\n"
        "    record = {'args': args, 'key': os.environ.get('AWS_ACCESS_KEY_ID', '')}\n"
        f"    with open({str(calls)!r}, 'a') as log: log.write(json.dumps(record) + '\\n')\n"
        f"os.execv({real!r}, [{real!r}, *sys.argv[1:]])\n"
    )
    wrapper.chmod(0o755)
    run.env["PATH"] = f"{wrapper_dir}:{run.env['PATH']}"
    return calls


def aws_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def aws_calls(path: Path) -> list[list[str]]:
    return [record["args"] for record in aws_records(path)]


def put_secrets(run) -> tuple[str, str]:
    """An SSM SecureString under /training-infra/ and a Secrets Manager secret: their references."""
    session = run.extra["session"]
    name = f"/training-infra/{run.config.outputs_bucket}/hf-token"
    session.client("ssm", endpoint_url=run.aws.endpoint).put_parameter(Name=name, Value=HF_TOKEN, Type="SecureString")
    arn = session.client("secretsmanager", endpoint_url=run.aws.endpoint).create_secret(
        Name=f"training-infra/{run.config.outputs_bucket}/wandb", SecretString=WANDB_KEY
    )["ARN"]
    return f"ssm:{name}", arn


def new_role(run, prefix: str) -> str:
    """A role on the local AWS (moto does not enforce trust or session policies; the templates are asserted)."""
    iam = run.extra["session"].client("iam", endpoint_url=run.aws.endpoint)
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "*"}]}
    name = f"{prefix}-{run.config.outputs_bucket}"
    return iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]


def trainer_role(run) -> str:
    return new_role(run, "trainer")


def give_secrets(run, references: str) -> str:
    """TI_SECRETS for the run, and the secrets reader role the compute construct makes: its ARN."""
    reader = new_role(run, "secrets-reader")
    run.env["TI_SECRETS"] = references
    run.config = dataclasses.replace(run.config, secrets_reader_role_arn=reader)
    return reader


# ---------------------------------------------------------------- uploads and run ids (process runtime)


def test_symlinks_in_outputs_and_checkpoints_to_host_files_are_not_uploaded(make_run, tmp_path):
    host = tmp_path / "host-only"
    host.mkdir()
    (host / "shadow").write_text("root:HOST-SECRET:0:0\n")
    trainer = (
        f'ln -s {host}/shadow "$OUTPUT_DIR/shadow"; ln -s {host} "$OUTPUT_DIR/etc"; '
        f'ln -s {host}/shadow "$CHECKPOINT_DIR/ckpt-999.pt"; echo real > "$OUTPUT_DIR/model.txt"; '
        'echo epoch > "$CHECKPOINT_DIR/ckpt-001.pt"'
    )
    run = make_run(run_id="symlinks", training_command=trainer).run(timeout=90)

    assert run.status()["outcome"] == "succeeded", run.setup_log
    assert run.keys("runs/symlinks/outputs/") == ["runs/symlinks/outputs/model.txt"]
    assert run.keys("checkpoints/symlinks/") == [
        "checkpoints/symlinks/_manifest.json",
        "checkpoints/symlinks/ckpt-001.pt",
    ]
    manifest = json.loads(run.read("checkpoints/symlinks/_manifest.json"))
    assert list(manifest["files"]) == ["ckpt-001.pt"] and manifest["files"]["ckpt-001.pt"]["size"] == 6, "no link"
    assert "HOST-SECRET" not in everything_uploaded(run)


@pytest.mark.parametrize("bad_id", ["../x", "a b"], ids=["dot-dot-slash", "space"])
def test_a_rejected_run_id_is_replaced_by_a_safe_fallback_in_every_s3_key(make_run, bad_id):
    run = make_run(run_id=bad_id).run(timeout=60)

    fallback = f"invalid-{run.imds.instance_id}"
    keys = run.keys()
    assert keys and all(key.startswith(f"runs/{fallback}/") for key in keys), keys
    status = json.loads(run.read(f"runs/{fallback}/status.json"))
    assert status["outcome"] == "failed" and status["run_id"] == fallback
    assert f"TI_RUN_ID='{bad_id}' is not allowed" in status["message"]
    assert run.called("poweroff")


# ---------------------------------------------------------------- secrets


def test_secrets_reach_the_trainer_environment_and_never_user_data_logs_or_status(make_run):
    run = make_run(run_id="secrets", training_command="true")
    hf_ref, wandb_ref = put_secrets(run)
    trainer = (
        'printf %s "$HF_TOKEN" | sha256sum > "$OUTPUT_DIR/hf.sha"; '
        'printf %s "$WANDB_API_KEY" | sha256sum > "$OUTPUT_DIR/wandb.sha"; '
        f'ls {run.root}/opt/training-infra/state > "$OUTPUT_DIR/state-files.txt"'
    )
    give_secrets(run, f"HF_TOKEN={hf_ref}\nWANDB_API_KEY={wandb_ref}")
    run.config = dataclasses.replace(run.config, training_command=trainer)
    calls = recording_aws(run, ("ssm", "secretsmanager"))
    run.run(timeout=90)

    assert run.status()["outcome"] == "succeeded", run.setup_log
    assert run.read("runs/secrets/outputs/hf.sha").split()[0] == sha256(HF_TOKEN)
    assert run.read("runs/secrets/outputs/wandb.sha").split()[0] == sha256(WANDB_KEY)
    assert "secrets.env" not in run.read("runs/secrets/outputs/state-files.txt"), "removed once the trainer has it"
    assert not (run.root / "opt/training-infra/state/secrets.env").exists()
    assert [call[:2] for call in aws_calls(calls)] == [["ssm", "get-parameter"], ["secretsmanager", "get-secret-value"]]
    assert "--with-decryption" in aws_calls(calls)[0]
    user_data = (run.tmp / "user-data.sh").read_text()
    for value in (HF_TOKEN, WANDB_KEY):
        assert value not in everything_uploaded(run) and value not in user_data


def test_secrets_are_read_with_a_reader_session_whose_policy_names_only_the_given_references(make_run):
    run = make_run(run_id="secret-policy", training_command="true")
    hf_ref, wandb_ref = put_secrets(run)
    reader = give_secrets(run, f"HF_TOKEN={hf_ref}\nWANDB_API_KEY={wandb_ref}")
    calls = recording_aws(run, ("sts", "ssm", "secretsmanager", "s3"))
    run.run(timeout=90)

    assert run.status()["outcome"] == "succeeded", run.setup_log
    records = aws_records(calls)
    [assume] = [r["args"] for r in records if r["args"][:2] == ["sts", "assume-role"]]
    assert assume[assume.index("--role-arn") + 1] == reader
    assert assume[assume.index("--duration-seconds") + 1] == "900"
    region, parameter = run.aws.region, hf_ref.removeprefix("ssm:")
    assert json.loads(assume[assume.index("--policy") + 1]) == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "ssm:GetParameter",
                "Resource": [f"arn:aws:ssm:{region}:{ACCOUNT}:parameter{parameter}"],
            },
            {
                "Effect": "Allow",
                "Action": "secretsmanager:GetSecretValue",
                "Resource": [wandb_ref],  # a full ARN (AWS's 6-character suffix): named as it is
            },
            {
                "Effect": "Allow",
                "Action": "kms:Decrypt",
                "Resource": f"arn:aws:kms:{region}:{ACCOUNT}:key/*",
                "Condition": {
                    "StringEquals": {
                        "kms:ViaService": [f"ssm.{region}.amazonaws.com", f"secretsmanager.{region}.amazonaws.com"]
                    }
                },
            },
        ],
    }
    reads = [r for r in records if r["args"][0] in ("ssm", "secretsmanager")]
    own_key = run.env["AWS_ACCESS_KEY_ID"]
    assert len(reads) == 2 and all(r["key"] not in ("", own_key) for r in reads), "the reader session's keys"
    assert len({r["key"] for r in reads}) == 1, "one session for all the run's references"
    later = [r for r in records if r["args"][0] == "s3"]
    assert later and all(r["key"] == own_key for r in later), "the session is dropped: uploads use the instance's"


def test_an_unreadable_secret_fails_the_run_naming_the_reference_before_the_trainer_starts(make_run):
    missing = "ssm:/training-infra/does-not-exist"
    run = make_run(run_id="secret-missing", env={"TI_RETRY_ATTEMPTS": "2"})
    give_secrets(run, f"HF_TOKEN={missing}")
    run.run(timeout=60)

    status = run.status()
    assert (status["outcome"], status["exit_code"]) == ("failed", None)
    assert status["message"] == "could not read TI_SECRETS (see the setup log)"
    assert "ParameterNotFound" in run.setup_log and "starting trainer" not in run.setup_log


def test_a_secret_setting_that_is_not_a_reference_is_refused_before_any_network_call(make_run):
    run = make_run(run_id="secret-literal", env={"TI_SECRETS": "HF_TOKEN=hf_literal_value"}).run(timeout=60)

    assert run.status()["message"] == (
        "TI_SECRETS line 'HF_TOKEN=hf_literal_value' is not allowed: "
        "use NAME=ssm:/PATH or NAME=arn:aws:secretsmanager:..."
    )
    assert run.imds.requests == []


# ---------------------------------------------------------------- the trainer role (process runtime)


# A trainer with an AWS SDK: records the access key its one boto3 session signs with until it has
# seen the agent's renewed session (60 s at most), then makes a real call with it.
SDK_TRAINER = """
import json, os, time
import boto3
session, seen = boto3.Session(), []
for _ in range(120):
    key = session.get_credentials().get_frozen_credentials().access_key
    seen += [key] if key not in seen else []
    if len(seen) >= 2:
        break
    time.sleep(0.5)
arn = session.client("sts").get_caller_identity()["Arn"]
names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
instance_keys = [name for name in names if name in os.environ]
with open(os.path.join(os.environ["OUTPUT_DIR"], "sdk.json"), "w") as out:
    json.dump({"keys": seen, "arn": arn, "instance_keys": instance_keys}, out)
"""


def test_trainer_role_session_is_credential_process_json_that_a_running_sdk_picks_up_when_renewed(make_run):
    run = make_run(run_id="role-run", training_command="true")
    role_arn = trainer_role(run)
    script = run.tmp / "sdk_trainer.py"
    script.write_text(SDK_TRAINER)
    command = f"{sys.executable} {script}"
    run.config = dataclasses.replace(run.config, training_command=command, trainer_role_arn=role_arn)
    # STS's shortest session (15 min) is inside botocore's 15-minute refresh window: the SDK re-reads
    # the session on every use, so the agent's renewal every 2 s shows within seconds.
    run.env.update(TI_CREDENTIALS_REFRESH_SECONDS="2", TI_TRAINER_SESSION_SECONDS="900")
    calls = recording_aws(run)
    run.run(timeout=120)

    assert run.status()["outcome"] == "succeeded", run.setup_log
    assumes = [call for call in aws_calls(calls) if call[:2] == ["sts", "assume-role"]]
    assert len(assumes) >= 2, "assumed at start, then renewed every 2 s while the trainer ran"
    first = assumes[0]
    assert first[first.index("--role-arn") + 1] == role_arn
    assert first[first.index("--tags") + 1] == "Key=training-infra:run-id,Value=role-run"
    assert first[first.index("--duration-seconds") + 1] == "900"
    sdk = json.loads(run.read("runs/role-run/outputs/sdk.json"))
    assert len(sdk["keys"]) == 2, "one boto3 session saw the renewed keys without a restart"
    assert sdk["instance_keys"] == [], "no instance credentials in its environment"
    assert re.fullmatch(r"arn:aws:sts::\d{12}:assumed-role/trainer-[^/]+/ti-role-run", sdk["arn"]), sdk["arn"]
    aws_dir = run.root / "opt/training-infra/state/aws"
    session = json.loads((aws_dir / "session.json").read_text())
    assert set(session) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
    assert session["Version"] == 1
    assert (aws_dir / "session.json").stat().st_mode & 0o777 == 0o600
    assert (aws_dir / "config").read_text() == f"[default]\ncredential_process = cat '{aws_dir}/session.json'\n"
    assert not list(aws_dir.glob("*.new")), "each renewal is renamed into place"


# A long-running SDK user: prints the access key of its one session each time it reads a line.
KEY_PRINTER = """
import sys
import boto3
session = boto3.Session()
for _ in sys.stdin:
    print(session.get_credentials().get_frozen_credentials().access_key, flush=True)
"""


def write_session(path: Path, key: str, expires_in: float) -> None:
    """What the agent writes (credential_process JSON), beside and renamed as the agent does."""
    expiration = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expires_in)
    body = {"Version": 1, "AccessKeyId": key, "SecretAccessKey": "s", "SessionToken": "t",
            "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
    path.with_suffix(".new").write_text(json.dumps(body))
    path.with_suffix(".new").rename(path)


def test_a_running_boto3_session_keeps_its_keys_until_the_refresh_window_then_reads_the_rewritten_session(tmp_path):
    """botocore refreshes credential_process credentials 15 minutes before Expiration (10: mandatory)."""
    aws_dir = tmp_path / "aws"
    aws_dir.mkdir()
    config, session = aws_dir / "config", aws_dir / "session.json"
    # The agent's own function writes the config (the process runtime's: the host path).
    trainer_aws_config(aws_dir, str(aws_dir))
    # Inside botocore's 15-minute window 20 s from now (the Expiration's seconds are truncated, so 19-20 s): time
    # for the child's import and first two reads on a busy box (a second or two; 18 s allowed).
    written_at = time.monotonic()
    write_session(session, "KEY-FIRST", expires_in=15 * 60 + 20)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "AWS_CONFIG_FILE": str(config),
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", KEY_PRINTER], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip

    def key_now() -> str:
        child.stdin.write("\n")
        child.stdin.flush()
        return child.stdout.readline().strip()

    try:
        first = key_now()
        write_session(session, "KEY-RENEWED", expires_in=3600)
        before_window = key_now()
        assert time.monotonic() - written_at < 18, "the first two reads must come before the window opens"
        time.sleep(max(0.0, written_at + 22 - time.monotonic()))  # now inside the first session's window
        after_window = key_now()
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    assert (first, before_window, after_window) == ("KEY-FIRST", "KEY-FIRST", "KEY-RENEWED")


# ---------------------------------------------------------------- docker flags (stand-in Docker CLI)

FAKE_DOCKER = """#!{python}
'''Stands in for the Docker CLI: records each call; `run` records what its files held and exits 0.'''
import json, os, pathlib, sys, time
state = pathlib.Path({state!r})
args = sys.argv[1:]
call = {{"argv": args, "files": {{}}}}
if args[0] == "login":
    sys.stdin.read()
if args[0] == "run":
    paths = [args[i + 1] for i, a in enumerate(args) if a == "--env-file"]
    mounts = [args[i + 1] for i, a in enumerate(args) if a == "-v" and "/run/training-infra/aws" in args[i + 1]]
    paths += [mount.split(":")[0] + name for mount in mounts for name in ("/config", "/session.json")]
    for path in paths:
        call["files"][path] = {{"mode": oct(os.stat(path).st_mode & 0o777), "text": open(path).read()}}
    (state / "container-created").touch()
with open(state / "docker-calls.jsonl", "a") as log:
    log.write(json.dumps(call) + "\\n")
if args[:2] == ["container", "inspect"]:
    sys.exit(0 if (state / "container-created").exists() else 1)
if args[0] == "run":
    time.sleep(1)
"""


def fake_docker_run(make_run, **overrides):
    run = make_run(**overrides)
    fake = run.tmp / "bin" / "docker"
    fake.write_text(FAKE_DOCKER.format(python=sys.executable, state=str(run.tmp)))
    fake.chmod(0o755)
    run.env.update(TI_RUNTIME="docker", TI_DOCKER=str(fake))
    return run


def docker_run_call(run) -> dict:
    calls = [json.loads(line) for line in (run.tmp / "docker-calls.jsonl").read_text().splitlines()]
    runs = [call for call in calls if call["argv"][0] == "run"]
    assert len(runs) == 1, f"{calls}\n{run.setup_log}"
    return runs[0]


def half_the_memory_or_1g() -> str:
    total = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
    return f"{max(total // 2, 1024 * 1024)}k"


def test_container_runs_without_new_privileges_host_ipc_or_aws_credentials_only_the_region(make_run):
    run = fake_docker_run(make_run, run_id="flags", training_command="python train.py")
    run.run(timeout=60)

    argv = docker_run_call(run)["argv"]
    assert run.status()["outcome"] == "succeeded", run.setup_log
    assert "--ipc=host" not in argv
    assert argv[argv.index("--security-opt") + 1] == "no-new-privileges"
    assert argv[argv.index("--shm-size") + 1] == half_the_memory_or_1g()
    env = [argv[i + 1] for i, a in enumerate(argv) if a == "-e"]
    assert f"AWS_REGION={run.aws.region}" in env and "AWS_EC2_METADATA_DISABLED=true" in env
    assert "TENSORBOARD_DIR=/outputs/tensorboard" in env, "issue 27: under /outputs, synced with the logs"
    assert not [e for e in env if e.startswith(("AWS_ACCESS_KEY_ID", "AWS_SECRET", "AWS_SESSION", "AWS_CONFIG"))]
    assert not [a for a in argv if "/run/training-infra/aws" in a], "no credentials mount without a trainer role"


def test_container_gets_secrets_from_a_0600_env_file_removed_after_start_and_role_credentials_read_only(make_run):
    run = fake_docker_run(make_run, run_id="docker-secrets", training_command="python train.py")
    hf_ref, _ = put_secrets(run)
    give_secrets(run, f"HF_TOKEN={hf_ref}")
    run.config = dataclasses.replace(run.config, trainer_role_arn=trainer_role(run))
    run.run(timeout=60)

    call = docker_run_call(run)
    argv, files = call["argv"], call["files"]
    assert run.status()["outcome"] == "succeeded", run.setup_log
    secrets_file = str(run.root / "opt/training-infra/state/secrets.env")
    assert files[secrets_file] == {"mode": "0o600", "text": f"HF_TOKEN={HF_TOKEN}\n"}
    assert files[str(run.root / "opt/training-infra/state/trainer.env")]["mode"] == "0o600", "--env values too"
    assert not Path(secrets_file).exists(), "removed once the container exists"
    state = run.root / "opt/training-infra/state"
    assert f"{state}/aws:/run/training-infra/aws:ro" in argv
    assert "AWS_CONFIG_FILE=/run/training-infra/aws/config" in argv
    config = files[f"{state}/aws/config"]["text"]
    assert config == "[default]\ncredential_process = cat '/run/training-infra/aws/session.json'\n", "container path"
    session = files[f"{state}/aws/session.json"]
    assert session["mode"] == "0o600" and json.loads(session["text"])["SessionToken"]
    assert HF_TOKEN not in json.dumps(argv) and HF_TOKEN not in everything_uploaded(run)


# ---------------------------------------------------------------- on a real container engine


def test_container_on_a_real_engine_has_no_new_privileges_a_sized_shm_secrets_and_read_only_role_credentials(
    make_run, container_engine
):
    run = make_run(run_id="ctr-secure", engine=container_engine)
    hf_ref, _ = put_secrets(run)
    trainer = (
        "grep NoNewPrivs /proc/self/status > /outputs/nnp.txt; df -k /dev/shm | tail -n 1 > /outputs/shm.txt; "
        # what a PyTorch DataLoader worker does: put a batch larger than Docker's 64 MiB default in /dev/shm
        "dd if=/dev/zero of=/dev/shm/batch bs=1048576 count=256 2>/dev/null && echo written > /outputs/shm-write.txt; "
        'printf %s "$HF_TOKEN" | sha256sum > /outputs/hf.sha; env | grep ^AWS_ | sort > /outputs/aws-env.txt; '
        # what an SDK does with the config: run its credential_process (cat, in the image) and read the JSON
        'sh -c "$(sed -n "s/^credential_process = //p" "$AWS_CONFIG_FILE")" | grep -c SessionToken '
        "> /outputs/creds.txt; "
        "(echo x >> /run/training-infra/aws/session.json) 2>/dev/null || echo read-only > /outputs/creds-write.txt"
    )
    give_secrets(run, f"HF_TOKEN={hf_ref}")
    run.config = dataclasses.replace(run.config, training_command=trainer, trainer_role_arn=trainer_role(run))
    run.run(timeout=120)

    assert run.status()["outcome"] == "succeeded", run.setup_log

    def output(name: str) -> str:
        return run.read(f"runs/ctr-secure/outputs/{name}")

    assert output("nnp.txt").split() == ["NoNewPrivs:", "1"]
    assert abs(int(output("shm.txt").split()[1]) - int(half_the_memory_or_1g()[:-1])) <= 4, "rounded to pages"
    assert output("shm-write.txt") == "written\n"
    assert output("hf.sha").split()[0] == sha256(HF_TOKEN)
    region = run.aws.region
    assert output("aws-env.txt").splitlines() == [
        "AWS_CONFIG_FILE=/run/training-infra/aws/config",
        f"AWS_DEFAULT_REGION={region}",
        "AWS_EC2_METADATA_DISABLED=true",
        f"AWS_REGION={region}",
    ]
    assert output("creds.txt") == "1\n" and output("creds-write.txt") == "read-only\n"
    assert run.engine.containers() == []


# ---------------------------------------------------------------- restore paths from S3 (issue 22)


def escapes(run) -> list[Path]:
    """Files named escape* anywhere around the box's root: where a '../' key would have landed."""
    return sorted(path for path in run.tmp.rglob("escape*") if path.is_file())


def test_a_manifest_naming_a_path_outside_checkpoints_fails_the_attempt_and_writes_nothing(make_run):
    """The trainer role may write checkpoints/<run>/ and learns version ids from its own puts: a manifest
    naming ../../escape.txt at such a version once wrote that file as root outside /checkpoints."""
    run = make_run(run_id="dotdot-manifest")
    bucket, prefix = run.config.outputs_bucket, "checkpoints/dotdot-manifest/"
    planted = run.s3.put_object(Bucket=bucket, Key=prefix + "../../escape.txt", Body=b"pwned\n")["VersionId"]
    good = run.s3.put_object(Bucket=bucket, Key=prefix + "ckpt-000003.npz", Body=b"x")["VersionId"]
    manifest = {
        "files": {
            "ckpt-000003.npz": {"version_id": good, "etag": "", "size": 1},
            "../../escape.txt": {"version_id": planted, "etag": "", "size": 6},
        },
        "written_at": "2026-12-04T10:00:00Z",
    }
    run.s3.put_object(Bucket=bucket, Key=prefix + "_manifest.json", Body=json.dumps(manifest).encode())
    run.run()

    status = run.status()
    assert status["outcome"] == "failed" and status["exit_code"] is None, "no trainer ran"
    assert "checkpoint manifest names '../../escape.txt'" in status["message"], status["message"]
    assert "nothing restored" in status["message"]
    assert escapes(run) == [] and not list((run.root / "checkpoints").iterdir()), "nothing written at all"
    refusals = [line for line in run.setup_log.splitlines() if "refused checkpoint key" in line]
    assert len(refusals) == 1 and "checkpoints/dotdot-manifest/'../../escape.txt'" in refusals[0]


def test_keys_outside_checkpoints_without_a_manifest_are_left_out_and_the_run_resumes_from_the_rest(make_run):
    run = make_run(run_id="dotdot-keys")
    bucket, prefix = run.config.outputs_bucket, "checkpoints/dotdot-keys/"
    run.s3.put_object(Bucket=bucket, Key=prefix + "../../escape-key.txt", Body=b"pwned\n")
    checkpoint = io.BytesIO()
    np.savez(checkpoint, weights=np.zeros(4), epoch=5)
    run.s3.put_object(Bucket=bucket, Key=prefix + "ckpt-000005.npz", Body=checkpoint.getvalue())
    run.run()

    status = run.status()
    assert status["outcome"] == "succeeded", run.setup_log
    assert "resumed from checkpoint ckpt-000005.npz (epoch 5)" in run.training_log, "the safe key was restored"
    assert escapes(run) == []
    assert run.setup_log.count("refused checkpoint key checkpoints/dotdot-keys/'../../escape-key.txt'") == 1
