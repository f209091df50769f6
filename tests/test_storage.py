"""The storage stack keeps data safe and cheap: private, encrypted, TLS-only, versioned, retained."""

from __future__ import annotations

import json

import pytest
from aws_cdk.assertions import Match

from training_infra import naming

STACK = naming.STORAGE_STACK


@pytest.fixture(scope="module")
def storage(synth):
    return synth("defaults")


def _bucket(storage, logical_prefix: str) -> dict:
    (bucket,) = [r for key, r in storage.resources(STACK, "AWS::S3::Bucket").items() if key.startswith(logical_prefix)]
    return bucket


def test_three_buckets_all_private_encrypted_versioned_and_retained(storage):
    buckets = storage.resources(STACK, "AWS::S3::Bucket")
    assert len(buckets) == 3
    for bucket in buckets.values():
        props = bucket["Properties"]
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True,
        }  # fmt: skip
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"][
            "SSEAlgorithm"
        ]
        assert props["VersioningConfiguration"] == {"Status": "Enabled"}
        assert bucket["DeletionPolicy"] == "Retain" and bucket["UpdateReplacePolicy"] == "Retain"
        assert "BucketName" not in props, "physical names are generated"
        assert "AccessControl" not in props


def test_every_bucket_policy_denies_plain_http_and_tls_below_1_2(storage):
    policies = storage.resources(STACK, "AWS::S3::BucketPolicy")
    assert len(policies) == 3
    for policy in policies.values():
        statements = policy["Properties"]["PolicyDocument"]["Statement"]
        denies = [s for s in statements if s["Effect"] == "Deny"]
        assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for s in denies)
        assert any(s["Condition"] == {"NumericLessThan": {"s3:TlsVersion": 1.2}} for s in denies)
        public_allows = [s for s in statements if s["Effect"] == "Allow" and s.get("Principal") in ("*", {"AWS": "*"})]
        assert public_allows == [], "nothing public"


def test_data_and_outputs_buckets_log_access_to_the_log_bucket(storage):
    for prefix, log_prefix in (("StorageDataBucket", "data-bucket/"), ("StorageOutputsBucket", "outputs-bucket/")):
        logging = _bucket(storage, prefix)["Properties"]["LoggingConfiguration"]
        assert logging["LogFilePrefix"] == log_prefix
        assert logging["DestinationBucketName"]["Ref"].startswith("StorageAccessLogsBucket")


def _rules(bucket: dict) -> dict[str, dict]:
    return {rule["Id"]: rule for rule in bucket["Properties"]["LifecycleConfiguration"]["Rules"]}


def test_lifecycle_aborts_uploads_expires_old_versions_and_tiers_data(storage):
    for prefix in ("StorageDataBucket", "StorageOutputsBucket", "StorageAccessLogsBucket"):
        rules = _rules(_bucket(storage, prefix))
        assert rules["AbortIncompleteUploads"]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}
    data = _rules(_bucket(storage, "StorageDataBucket"))
    assert data["ExpireNoncurrentVersions"]["NoncurrentVersionExpiration"] == {"NoncurrentDays": 30}
    assert data["DataIntelligentTiering"]["Prefix"] == "data/"
    assert data["DataIntelligentTiering"]["Transitions"] == [
        {"StorageClass": "INTELLIGENT_TIERING", "TransitionInDays": 0}
    ]


def test_older_runs_move_to_cheaper_classes_and_checkpoints_expire(storage):
    rules = _rules(_bucket(storage, "StorageOutputsBucket"))
    runs = rules["OlderRunsToCheaperClasses"]
    assert runs["Prefix"] == "runs/"
    assert [t["StorageClass"] for t in runs["Transitions"]] == ["STANDARD_IA", "GLACIER_IR"]
    checkpoints = rules["ExpireCheckpoints"]
    assert checkpoints["Prefix"] == "checkpoints/"
    assert checkpoints["ExpirationInDays"] == 30


def test_checkpoint_retention_follows_its_setting(synth):
    """The "full" configuration sets checkpoint_retention_days=7 (the shared session synth, not a probe stack)."""
    synth("full").template(STACK).has_resource_properties(
        "AWS::S3::Bucket",
        {
            "LifecycleConfiguration": {
                "Rules": Match.array_with([Match.object_like({"Id": "ExpireCheckpoints", "ExpirationInDays": 7})])
            }
        },
    )


def test_storage_stack_has_termination_protection_and_the_seed_outputs(storage):
    manifest = json.loads((storage.outdir / "manifest.json").read_text())
    assert manifest["artifacts"][STACK]["properties"]["terminationProtection"] is True
    template = storage.templates[STACK]
    assert set(template["Outputs"]) >= {naming.OUTPUT_TRAINING_BUCKET, naming.OUTPUT_OUTPUTS_BUCKET}


def test_no_lambda_backed_auto_delete_exists(storage):
    assert storage.resources(STACK, "Custom::S3AutoDeleteObjects") == {}
    assert storage.resources(STACK, "AWS::Lambda::Function") == {}
