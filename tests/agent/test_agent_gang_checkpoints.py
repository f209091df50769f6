"""GangCheckpoints against the moto server's S3 (the AWS CLI and botocore as on the box): two nodes'
uploads, completeness, the pull of the other nodes' shards, the prune guard, the restore."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import pytest

from training_infra.compute.agent.ti_agent.aws import Aws
from training_infra.compute.agent.ti_agent.gang import GangCheckpoints


@pytest.fixture
def bucket(aws, monkeypatch):
    for key, value in aws.env.items():
        monkeypatch.setenv(key, value)  # botocore reads the process environment, as the agent's does
    s3 = boto3.client("s3", endpoint_url=aws.endpoint, region_name=aws.region)
    name = f"outputs-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return s3, name


def node(aws, bucket: str, folder: Path, k: int, lines: list[str]) -> GangCheckpoints:
    folder.mkdir(parents=True, exist_ok=True)
    state = folder.parent / f"state-{folder.name}"
    state.mkdir(exist_ok=True)
    client = Aws(region=aws.region, environ={**__import__("os").environ, **aws.env})
    return GangCheckpoints(
        aws=client, folder=folder, state_dir=state, bucket=bucket, run_id="g", node=k, nodes=2,
        log=lines.append, note=lines.append,
    )  # fmt: skip


def save(folder: Path, step: int, k: int, *, marker: bool = True) -> None:
    """What the trainer leaves on node k: its DCP shard (rank = k), rank 0 the .metadata, then the marker."""
    target = folder / f"step-{step:06d}"
    target.mkdir(parents=True)
    (target / f"__{k}_0.distcp").write_bytes(f"shard {k} of step {step}".encode())
    if k == 0:
        (target / ".metadata").write_bytes(b"dcp metadata")
    if marker:
        (target / f".node-{k}.done").write_bytes(b"")


def keys(s3, bucket: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="checkpoints/g/").get("Contents", [])}


def test_a_step_is_complete_only_once_every_node_uploaded_and_then_each_node_gets_the_others_shards(
    aws, bucket, tmp_path
):
    s3, name = bucket
    lines: list[str] = []
    zero, one = node(aws, name, tmp_path / "n0", 0, lines), node(aws, name, tmp_path / "n1", 1, lines)
    save(zero.folder, 4, 0)
    save(one.folder, 4, 1, marker=False)  # node 1 still saving
    assert zero.sync() and one.sync(), lines
    assert keys(s3, name) == {
        "checkpoints/g/_manifest.node-0.json", "checkpoints/g/step-000004/.metadata",
        "checkpoints/g/step-000004/__0_0.distcp", "checkpoints/g/step-000004/.node-0.done",
    }, "node 1 uploads nothing of a step it has not marked"  # fmt: skip
    manifest = json.loads(s3.get_object(Bucket=name, Key="checkpoints/g/_manifest.node-0.json")["Body"].read())
    assert set(manifest["steps"]["step-000004"]) == {".metadata", "__0_0.distcp"}
    assert all(v["version_id"] for v in manifest["steps"]["step-000004"].values()), "versions, as single-node runs"
    (one.folder / "step-000004" / ".node-1.done").write_bytes(b"")
    assert one.sync() and zero.sync(), lines
    for folder in (zero.folder, one.folder):
        assert {p.name for p in (folder / "step-000004").iterdir()} == {
            ".metadata", "__0_0.distcp", "__1_0.distcp", ".node-0.done", ".node-1.done"
        }, f"{folder.name} has the whole step: a restarted worker can load it"  # fmt: skip

    # The trainer deletes step 4 on node 0 while it is still the newest complete step: S3 keeps it.
    import shutil

    shutil.rmtree(zero.folder / "step-000004")
    save(zero.folder, 8, 0)
    assert zero.sync()
    assert "checkpoints/g/step-000004/__0_0.distcp" in keys(s3, name), "the newest complete step is never pruned"
    save(one.folder, 8, 1)
    assert one.sync() and zero.sync()
    left = keys(s3, name)
    assert "checkpoints/g/step-000004/__0_0.distcp" not in left, "\n".join(lines)
    assert "checkpoints/g/step-000004/.node-0.done" not in left
    assert "checkpoints/g/step-000004/__1_0.distcp" in left, "a node prunes its own files only"

    # A replacement node 1 restores the newest complete step, every node's files at their versions.
    fresh = node(aws, name, tmp_path / "replacement", 1, lines)
    fresh.restore()
    assert sorted(p.name for p in (fresh.folder / "step-000008").iterdir()) == [
        ".metadata", ".node-0.done", ".node-1.done", "__0_0.distcp", "__1_0.distcp"
    ]  # fmt: skip
    assert not (fresh.folder / "step-000004").exists(), "only the newest complete step"
    assert fresh.sync() and "checkpoints/g/_manifest.node-1.json" in keys(s3, name)
    assert (fresh.folder / "step-000008" / "__0_0.distcp").read_bytes() == b"shard 0 of step 8"


def test_a_replacement_keeps_the_lost_nodes_manifest_entries_and_prunes_its_superseded_files(aws, bucket, tmp_path):
    s3, name = bucket
    lines: list[str] = []
    zero, one = node(aws, name, tmp_path / "n0", 0, lines), node(aws, name, tmp_path / "n1", 1, lines)
    for step in (4, 8):
        save(zero.folder, step, 0)
        save(one.folder, step, 1)
        assert one.sync() and zero.sync(), lines
    manifest_key = "checkpoints/g/_manifest.node-1.json"
    before = json.loads(s3.get_object(Bucket=name, Key=manifest_key)["Body"].read())["steps"]
    assert set(before) == {"step-000004", "step-000008"}

    # Node 1 is lost; its replacement restores step 8 (only), trains on and saves step 12.
    fresh = node(aws, name, tmp_path / "replacement", 1, lines)
    fresh.restore()
    save(fresh.folder, 12, 1)
    assert fresh.sync(), lines
    after = json.loads(s3.get_object(Bucket=name, Key=manifest_key)["Body"].read())["steps"]
    assert after["step-000008"] == before["step-000008"], "the lost node's versions of step 8 are still recorded"
    assert set(after) >= {"step-000008", "step-000012"}

    # Step 12 completes; the replacement's trainer keeps only step 12: node 1's older files go, as the lost node's
    # own prune would have deleted them (before, nobody did: they stayed in S3 for good).
    save(zero.folder, 12, 0)
    assert zero.sync() and fresh.sync(), lines
    import shutil

    shutil.rmtree(fresh.folder / "step-000008")
    assert fresh.sync(), lines
    left = keys(s3, name)
    assert not {k for k in left if k.startswith(("checkpoints/g/step-000004/__1", "checkpoints/g/step-000008/__1"))}
    assert "checkpoints/g/step-000012/__1_0.distcp" in left and "checkpoints/g/step-000008/__0_0.distcp" in left
