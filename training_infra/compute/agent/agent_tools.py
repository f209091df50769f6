"""The agent's Python helpers (CloudWatch log batches, status.json), run by agent.sh on the instance.

Standard library only: the AMI's python3 promises no boto3; the agent calls the AWS CLI itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# CloudWatch PutLogEvents limits: 1,048,576 bytes (26 bytes of overhead per event), 10,000 events,
# 256 KB per event. Reading less keeps every batch inside them whatever the lines look like.
BATCH_READ_BYTES = 900_000
BATCH_MAX_EVENTS = 5_000
EVENT_MAX_CHARS = 200_000


def next_log_batch(log: Path, offset: int, *, final: bool, now_ms: int) -> tuple[list[dict], int] | None:
    """Events after byte `offset` and the offset after them (None: nothing new). A last line with no
    newline is still being written and waits, unless `final`; blank lines are consumed, not sent."""
    with open(log, "rb") as handle:
        handle.seek(offset)
        parts = handle.read(BATCH_READ_BYTES).splitlines(keepends=True)[:BATCH_MAX_EVENTS]
    if parts and not final and not parts[-1].endswith((b"\n", b"\r")):
        parts.pop()
    if not parts:
        return None
    lines = (part.decode("utf-8", "replace").rstrip("\r\n")[:EVENT_MAX_CHARS] for part in parts)
    events = [{"timestamp": now_ms, "message": line} for line in lines if line.strip()]
    return events, offset + sum(map(len, parts))


def log_batch(log: Path, offset_file: Path, batch_file: Path, *, final: bool) -> int:
    """Write the next batch and the offset it reaches (the agent commits it after the upload worked);
    return its event count, or -1 when all is shipped."""
    offset = int(offset_file.read_text() or 0) if offset_file.exists() else 0
    batch = next_log_batch(log, offset, final=final, now_ms=int(time.time() * 1000))
    if batch is None:
        return -1
    events, next_offset = batch
    batch_file.write_text(json.dumps(events))
    Path(f"{offset_file}.next").write_text(str(next_offset))
    return len(events)


def observe_progress(heartbeat: Path, state_file: Path, now: float, *, since: float = 0) -> dict:
    """Fold the trainer's heartbeat file into the agent's progress state (kept in `state_file`).

    A JSON object with a numeric `step` is progress when the step changes; any other content
    (a touch, other keys, text that is not JSON: said once on stderr) when the file is written
    again; its time is the file's modification time. A file last written before `since` (the
    trainer's start) is no beat: one restored with /checkpoints or left by an earlier attempt would
    otherwise be this attempt's last progress, and a stall at once. The state: step,
    steps_per_second (between the last two changes), changed_at (ISO) and changed_epoch; {} until a beat.
    """
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    try:
        written = heartbeat.stat().st_mtime_ns
        if written < since * 1e9:
            return state
        text = heartbeat.read_text(errors="replace")[:65536]
    except OSError:
        return state
    step = None
    try:
        beat = json.loads(text) if text.strip() else None
        if isinstance(beat, dict) and isinstance(beat.get("step"), int | float) and not isinstance(beat["step"], bool):
            step = beat["step"]
    except ValueError:
        if not state.get("said_not_json"):
            print(f"heartbeat file {heartbeat} is not JSON: counted as a touch (said once)", file=sys.stderr)
            state["said_not_json"] = True
    progressed = state.get("step") != step if step is not None else state.get("written") != written
    if progressed or "changed_epoch" not in state:
        at = min(written / 1e9, now)  # when the trainer wrote it, not when the agent looked
        previous_step, previous_at = state.get("step"), state.get("changed_epoch")
        rate = state.get("steps_per_second")
        if step is not None and previous_step is not None and previous_at is not None and at > previous_at:
            rate = round((step - previous_step) / (at - previous_at), 3)
        state.update(
            step=step,
            steps_per_second=rate if step is not None else None,
            changed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
            changed_epoch=at,
        )
    state["written"] = written
    state_file.with_suffix(".new").write_text(json.dumps(state))
    state_file.with_suffix(".new").replace(state_file)
    return state


def progress_record(state: dict) -> dict | None:
    """What status.json and progress.json say: null when the trainer never reported progress."""
    if "changed_epoch" not in state:
        return None
    return {key: state.get(key) for key in ("step", "steps_per_second", "changed_at")}


MANIFEST = "_manifest.json"


def checkpoint_files(folder: Path, skip: str = "") -> dict[str, list[int]]:
    """What a sync uploads: regular files (no symlinks), not *.tmp, not the manifest, not `skip` (the
    heartbeat when it lives there: an old beat restored by the next attempt would look like progress);
    name -> [size, mtime_ns]."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not path.is_symlink() and not name.endswith(".tmp") and name not in (MANIFEST, skip):
            found[name] = [path.stat().st_size, path.stat().st_mtime_ns]
    return found


def latest_versions(listing: object, prefix: str) -> dict[str, dict]:
    """The newest version of each object under `prefix` from `list-object-versions --query
    'Versions[?IsLatest].[Key,VersionId,ETag,Size]'` (null when there are none); name -> version."""
    versions = {}
    for key, version_id, etag, size in listing or []:
        if key.startswith(prefix) and key != prefix + MANIFEST:
            versions[key[len(prefix) :]] = {"version_id": version_id, "etag": etag, "size": size}
    return versions


def commit_manifest(
    folder: Path, snapshot: dict[str, list[int]], latest: dict[str, dict], now: float, skip: str = ""
) -> tuple[dict | None, list[str]]:
    """The set a finished upload carried, by the S3 version it made of each file; or None and the files
    that moved under it, when the upload cannot vouch for a whole set.

    The upload (which succeeded) took the files present at its start (the snapshot). One unchanged since,
    or deleted meanwhile (a rotated checkpoint: the AWS CLI read it whole first), came whole when S3's
    newest version has its size. One rewritten meanwhile may have been read half old, half new, and one
    deleted before the CLI read it never reached S3 (half of a sharded checkpoint, say): then the
    previous manifest stays, its versions still in S3 (the outputs bucket is versioned), and nothing is
    deleted this round. Recording versions makes a restore exact even after a later upload was cut
    short. The second value: objects neither in the manifest nor on disk, which the agent deletes only
    after this manifest is in S3.
    """
    current = checkpoint_files(folder, skip)
    moved = sorted(
        name
        for name, meta in snapshot.items()
        if (name in current and current[name] != meta) or latest.get(name, {}).get("size") != meta[0]
    )
    if moved:
        return None, moved
    files = {name: latest[name] for name in snapshot}
    stale = sorted(name for name in latest if name not in files and name not in current)
    written_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return {"files": files, "written_at": written_at}, stale


def _glob_escaped(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def restore_plan(manifest: dict, latest: dict[str, dict]) -> tuple[list[str], list[tuple[str, str]]]:
    """How to take exactly the manifest's set: `aws s3 sync` filters for the files whose newest version
    is the recorded one (the fast path), and (name, version id) for the rest, fetched by version.

    A manifest from before versions were recorded (name -> size) takes its files by name.
    """
    by_name, by_version = [], []
    for name, recorded in sorted(manifest["files"].items()):
        if not isinstance(recorded, dict) or latest.get(name, {}).get("version_id") == recorded["version_id"]:
            by_name.append(name)
        else:
            by_version.append((name, recorded["version_id"]))
    filters = ["--exclude", "*", *(arg for name in by_name for arg in ("--include", _glob_escaped(name)))]
    return filters, by_version


def delete_batches(prefix: str, names: list[str]) -> list[dict]:
    """`s3api delete-objects --delete` bodies, 1,000 keys each (the API's limit)."""
    keys = [{"Key": prefix + name} for name in names]
    return [{"Objects": keys[i : i + 1000], "Quiet": True} for i in range(0, len(keys), 1000)]


def build_status(
    *,
    run_id: str,
    attempt: int,
    outcome: str,
    exit_code: str,
    started_at: str,
    ended_at: str,
    duration_seconds: int,
    instance_id: str,
    instance_type: str,
    market: str,
    availability_zone: str,
    hourly_price_usd: float,
    image: str,
    message: str,
    progress: dict | None = None,
) -> dict:
    """runs/<id>/attempts/<n>/status.json and the run summary (docs/agent.md); `exit_code` "": no trainer ran."""
    return {
        "run_id": run_id,
        "attempt": attempt,
        "outcome": outcome,
        "exit_code": int(exit_code) if exit_code else None,
        "started_at": started_at,
        "ended_at": ended_at,
        "duration_seconds": duration_seconds,
        "instance_id": instance_id,
        "instance_type": instance_type,
        "market": market,
        "availability_zone": availability_zone,
        "hourly_price_usd": hourly_price_usd,
        # On-demand list price: an upper bound for spot, which usually costs far less.
        "estimated_cost_usd": round(hourly_price_usd * duration_seconds / 3600, 4),
        "image": image,
        "message": message,
        # The trainer's last progress (HEARTBEAT_FILE): {step, steps_per_second, changed_at}; null: never reported.
        "progress": progress,
    }


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


def manifest_command(args: argparse.Namespace) -> int:
    """snapshot: the files now; commit: the manifest and the delete batches, then says changed,
    unchanged or kept (and the files that moved); plan: what a restore takes by name (sync filters,
    one a line) and by version (name TAB version id, one a line), then says how many files it takes
    and how many other objects S3 holds."""
    if args.action == "snapshot":
        args.snapshot.write_text(json.dumps(checkpoint_files(args.folder, args.skip)))
        return 0
    latest = latest_versions(json.loads(args.versions.read_text()), args.prefix)
    if args.action == "commit":
        snapshot = json.loads(args.snapshot.read_text())
        manifest, stale = commit_manifest(args.folder, snapshot, latest, time.time(), args.skip)
        for old in args.manifest.parent.glob("ckpt.delete.*.json"):
            old.unlink()
        if manifest is None:
            print("kept", " ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else ""))
            return 0
        sent = json.loads(args.sent.read_text()) if args.sent and args.sent.exists() else {}
        # Every upload of the manifest is another object version to list: send it only when it changed.
        print("unchanged" if sent.get("files") == manifest["files"] else "changed")
        args.manifest.write_text(json.dumps(manifest, indent=1) + "\n")
        for number, batch in enumerate(delete_batches(args.prefix, stale)):
            args.manifest.with_name(f"ckpt.delete.{number}.json").write_text(json.dumps(batch))
        return 0
    manifest = json.loads(args.manifest.read_text())
    filters, by_version = restore_plan(manifest, latest)
    args.filters.write_text("\n".join(filters) + "\n")
    args.by_version.write_text("".join(f"{name}\t{version}\n" for name, version in by_version))
    print(len(manifest["files"]), len(set(latest) - set(manifest["files"])))  # taken, left in S3
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent_tools.py")
    commands = parser.add_subparsers(dest="command", required=True)
    batch = commands.add_parser("log-batch", help="next CloudWatch Logs batch of the training log")
    batch.add_argument("log", type=Path)
    batch.add_argument("offset_file", type=Path)
    batch.add_argument("batch_file", type=Path)
    batch.add_argument("--final", action="store_true", help="ship a last line even without its newline")
    manifest = commands.add_parser("manifest", help="checkpoint manifest: snapshot, commit or restore plan")
    manifest.add_argument("action", choices=["snapshot", "commit", "plan"])
    manifest.add_argument("--folder", type=Path, help="the checkpoint folder on the box")
    manifest.add_argument("--skip", default="", help="a file of the folder that is never synced (the heartbeat)")
    manifest.add_argument("--snapshot", type=Path, help="the files at the upload's start")
    manifest.add_argument("--versions", type=Path, help="list-object-versions output (newest versions)")
    manifest.add_argument("--prefix", default="", help="the run's key prefix, checkpoints/<run-id>/")
    manifest.add_argument("--manifest", type=Path, help="the manifest (commit writes it, plan reads it)")
    manifest.add_argument("--sent", type=Path, help="commit: the manifest last sent to S3 (prints changed/unchanged)")
    manifest.add_argument("--filters", type=Path, help="plan: sync filters for files taken by name")
    manifest.add_argument("--by-version", type=Path, help="plan: files taken by their recorded version")
    beat = commands.add_parser("progress", help="fold HEARTBEAT_FILE into the progress state; print changed step rate")
    beat.add_argument("heartbeat", type=Path)
    beat.add_argument("state_file", type=Path)
    beat.add_argument("now", type=float)
    beat.add_argument("--since", type=float, default=0, help="the trainer's start: older writes are no beats")
    policy = commands.add_parser("secrets-policy", help="session policy for the TI_SECRETS lines on stdin")
    policy.add_argument("role_arn")
    policy.add_argument("region")
    status = commands.add_parser("status", help="write status.json and print the cost estimate")
    status.add_argument("path", type=Path)
    for name in ("run-id", "outcome", "exit-code", "started-at", "ended-at", "instance-id", "instance-type",
                 "market", "availability-zone", "image", "message"):  # fmt: skip
        status.add_argument(f"--{name}", required=True)
    status.add_argument("--attempt", type=int, required=True)
    status.add_argument("--duration-seconds", type=int, required=True)
    status.add_argument("--hourly-price-usd", type=float, required=True)
    status.add_argument("--progress-file", type=Path, help="the progress state (absent: never reported)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "log-batch":
        print(log_batch(args.log, args.offset_file, args.batch_file, final=args.final))
        return 0
    if args.command == "manifest":
        return manifest_command(args)
    if args.command == "progress":
        state = observe_progress(args.heartbeat, args.state_file, args.now, since=args.since)
        if "changed_epoch" not in state:
            print("none")
        else:
            shown = [int(state["changed_epoch"]), state.get("step"), state.get("steps_per_second")]
            print(" ".join("-" if value is None else str(value) for value in shown))
        # What the agent uploads as the attempt's progress.json (status.json has the same record).
        args.state_file.with_name("progress.json").write_text(json.dumps(progress_record(state)) + "\n")
        return 0
    if args.command == "secrets-policy":
        policy = secrets_policy(sys.stdin.read().splitlines(), role_arn=args.role_arn, region=args.region)
        print(json.dumps(policy, separators=(",", ":")))
        return 0
    fields = {key: value for key, value in vars(args).items() if key not in ("command", "path", "progress_file")}
    state = json.loads(args.progress_file.read_text()) if args.progress_file and args.progress_file.exists() else {}
    status = build_status(**fields, progress=progress_record(state))
    args.path.write_text(json.dumps(status, indent=2) + "\n")
    print(status["estimated_cost_usd"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
