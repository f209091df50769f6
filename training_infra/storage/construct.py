"""Data and outputs buckets: the only state that matters, so it outlives every other stack."""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from training_infra import naming
from training_infra.policy import acknowledge_nag, as_seen_from, nag_name, skip_checkov


@dataclass(frozen=True)
class StorageProps:
    """The settings the buckets read (built from Settings in stacks.py)."""

    retain_data: bool = True  # RETAIN keeps every bucket when its stack is deleted
    noncurrent_version_days: int = 30
    checkpoint_retention_days: int = 30


class TrainingStorage(Construct):
    """Encrypted, versioned, TLS-only buckets with lifecycle rules a cost-conscious team expects.

    The construct ids of the three buckets are their logical ids: renaming one replaces the bucket
    (tests/test_storage.py pins them).
    """

    def __init__(self, scope: Construct, construct_id: str, *, props: StorageProps) -> None:
        super().__init__(scope, construct_id)
        removal = RemovalPolicy.RETAIN if props.retain_data else RemovalPolicy.DESTROY
        noncurrent = Duration.days(props.noncurrent_version_days)
        abort_uploads = s3.LifecycleRule(
            id="AbortIncompleteUploads", abort_incomplete_multipart_upload_after=Duration.days(7)
        )

        self.access_logs_bucket = s3.Bucket(
            self,
            "AccessLogsBucket",
            **_secure_bucket_defaults(removal),
            # Server access logging can only deliver to SSE-S3 buckets.
            encryption=s3.BucketEncryption.S3_MANAGED,
            lifecycle_rules=[
                abort_uploads,
                s3.LifecycleRule(
                    id="ExpireAccessLogs", expiration=Duration.days(365), noncurrent_version_expiration=noncurrent
                ),
            ],
        )
        skip_checkov(
            self.access_logs_bucket, "CKV_AWS_18", "This is the access-log bucket; logging it into itself would loop"
        )
        acknowledge_nag(
            self.access_logs_bucket,
            "S1",
            "This is the server access log destination; logging it into itself would loop",
        )

        self.data_bucket = s3.Bucket(
            self,
            "DataBucket",
            **_secure_bucket_defaults(removal),
            encryption=s3.BucketEncryption.S3_MANAGED,
            server_access_logs_bucket=self.access_logs_bucket,
            server_access_logs_prefix="data-bucket/",
            lifecycle_rules=[
                abort_uploads,
                s3.LifecycleRule(id="ExpireNoncurrentVersions", noncurrent_version_expiration=noncurrent),
                # Datasets are read in bursts; Intelligent-Tiering moves cold ones down without retrieval fees.
                s3.LifecycleRule(
                    id="DataIntelligentTiering",
                    prefix=naming.DATA_PREFIX,
                    transitions=[
                        s3.Transition(
                            storage_class=s3.StorageClass.INTELLIGENT_TIERING, transition_after=Duration.days(0)
                        )
                    ],
                ),
            ],
        )

        self.outputs_bucket = s3.Bucket(
            self,
            "OutputsBucket",
            **_secure_bucket_defaults(removal),
            encryption=s3.BucketEncryption.S3_MANAGED,
            server_access_logs_bucket=self.access_logs_bucket,
            server_access_logs_prefix="outputs-bucket/",
            lifecycle_rules=[
                abort_uploads,
                s3.LifecycleRule(id="ExpireNoncurrentVersions", noncurrent_version_expiration=noncurrent),
                # Finished runs are read a few times, then rarely: infrequent access after 30 days, Glacier IR after 90.
                s3.LifecycleRule(
                    id="OlderRunsToCheaperClasses",
                    prefix=naming.RUNS_PREFIX,
                    transitions=[
                        s3.Transition(
                            storage_class=s3.StorageClass.INFREQUENT_ACCESS, transition_after=Duration.days(30)
                        ),
                        s3.Transition(
                            storage_class=s3.StorageClass.GLACIER_INSTANT_RETRIEVAL, transition_after=Duration.days(90)
                        ),
                    ],
                ),
                # Checkpoints only matter while a run can still resume.
                s3.LifecycleRule(
                    id="ExpireCheckpoints",
                    prefix=naming.CHECKPOINTS_PREFIX,
                    expiration=Duration.days(props.checkpoint_retention_days),
                    noncurrent_version_expiration=Duration.days(1),
                ),
            ],
        )

    def grant_run_access(self, grantee: iam.IGrantable) -> iam.Grant:
        """What a training run needs, by prefix and exact action: read data/, write runs/ and checkpoints/.

        The object keys are per run and unknown at deploy, so the grant ends in prefix wildcards; the
        cdk-nag findings that causes are acknowledged here, on the grantee, named as cdk-nag names them.
        """
        principal = grantee.grant_principal
        consumer = principal if isinstance(principal, Construct) else self
        data_arn = as_seen_from(consumer, self.data_bucket, self.data_bucket.bucket_arn)
        outputs_arn = as_seen_from(consumer, self.outputs_bucket, self.outputs_bucket.bucket_arn)
        data_objects = f"{data_arn}/{naming.DATA_PREFIX}*"
        runs_objects = f"{outputs_arn}/{naming.RUNS_PREFIX}*"
        checkpoint_objects = f"{outputs_arn}/{naming.CHECKPOINTS_PREFIX}*"
        latest_objects = f"{outputs_arn}/{naming.LATEST_PREFIX}*"

        def grant(actions: list[str], resources: list[str], conditions: dict | None = None) -> iam.Grant:
            return iam.Grant.add_to_principal(
                grantee=grantee, actions=actions, resource_arns=resources, conditions=conditions
            )

        grants = [
            grant(
                ["s3:ListBucket"],
                [data_arn],
                {"StringLike": {"s3:prefix": [naming.DATA_PREFIX, f"{naming.DATA_PREFIX}*"]}},
            ),
            grant(["s3:GetObject"], [data_objects]),
            grant(
                ["s3:ListBucket"],
                [outputs_arn],
                {"StringLike": {"s3:prefix": [f"{naming.RUNS_PREFIX}*", f"{naming.CHECKPOINTS_PREFIX}*"]}},
            ),
            grant(["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"], [runs_objects, checkpoint_objects]),
            # The checkpoint manifest names the object versions of the last complete upload, and a restore
            # takes exactly those (docs/architecture.md, "Checkpoints"): versions of checkpoints/ only.
            grant(
                ["s3:ListBucketVersions"],
                [outputs_arn],
                {"StringLike": {"s3:prefix": [f"{naming.CHECKPOINTS_PREFIX}*"]}},
            ),
            grant(["s3:GetObjectVersion"], [checkpoint_objects]),
            # `aws s3 sync --delete` keeps runs/latest/ a copy of the newest finished run; checkpoints/<run>/
            # drops what the trainer no longer keeps (versioning still holds what either deletes).
            grant(["s3:DeleteObject"], [latest_objects, checkpoint_objects]),
        ]
        if isinstance(principal, Construct):
            for resource, why in (
                (data_objects, "read-only (s3:GetObject) on the data/ prefix of the data bucket"),
                (runs_objects, "get/put on runs/ of the outputs bucket: each run writes its own objects"),
                (
                    checkpoint_objects,
                    "get/put/delete and get-version on checkpoints/ of the outputs bucket: a mirror of the "
                    "trainer's checkpoints whose manifest names object versions",
                ),
                (latest_objects, "delete only under runs/latest/, which mirrors the newest finished run"),
            ):
                acknowledge_nag(
                    principal,
                    f"IAM5[Resource::{nag_name(principal, resource)}]",
                    f"Object keys are per run and unknown at deploy: {why}",
                )
        combined = grants[0]
        for other in grants[1:]:
            combined = combined.combine(other)
        return combined

    def grant_trainer_access(self, grantee: iam.IGrantable) -> iam.Grant:
        """The opt-in trainer role: read data/, write only its own run's runs/<id>/ and checkpoints/<id>/.

        The run id is the `training-infra:run-id` session tag the agent sets when it assumes the
        role, so one run's credentials cannot touch another run's objects. No delete, no runs/latest/.
        """
        run = f"${{aws:PrincipalTag/{naming.TAG_RUN_ID}}}"
        principal = grantee.grant_principal
        consumer = principal if isinstance(principal, Construct) else self
        data_arn = as_seen_from(consumer, self.data_bucket, self.data_bucket.bucket_arn)
        outputs_arn = as_seen_from(consumer, self.outputs_bucket, self.outputs_bucket.bucket_arn)
        data_objects = f"{data_arn}/{naming.DATA_PREFIX}*"
        run_prefixes = [f"{naming.RUNS_PREFIX}{run}/", f"{naming.CHECKPOINTS_PREFIX}{run}/"]
        run_objects = [f"{outputs_arn}/{prefix}*" for prefix in run_prefixes]

        def grant(actions: list[str], resources: list[str], conditions: dict | None = None) -> iam.Grant:
            return iam.Grant.add_to_principal(
                grantee=grantee, actions=actions, resource_arns=resources, conditions=conditions
            )

        grants = [
            grant(
                ["s3:ListBucket"],
                [data_arn],
                {"StringLike": {"s3:prefix": [naming.DATA_PREFIX, f"{naming.DATA_PREFIX}*"]}},
            ),
            grant(["s3:GetObject"], [data_objects]),
            grant(
                ["s3:ListBucket"],
                [outputs_arn],
                {"StringLike": {"s3:prefix": [f"{prefix}*" for prefix in run_prefixes]}},
            ),
            grant(["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"], run_objects),
        ]
        if isinstance(principal, Construct):
            reasons = [
                (data_objects, "read-only (s3:GetObject) on the data/ prefix of the data bucket"),
                (run_objects[0], "get/put only under runs/<its run id>/ (the session tag), never another run's"),
                (run_objects[1], "get/put only under checkpoints/<its run id>/ (the session tag), never another run's"),
            ]
            for resource, why in reasons:
                acknowledge_nag(
                    principal,
                    f"IAM5[Resource::{nag_name(principal, resource)}]",
                    f"Object keys are written by the trainer: {why}",
                )
        combined = grants[0]
        for other in grants[1:]:
            combined = combined.combine(other)
        return combined

    def grant_read_attempt_status(self, grantee: iam.IGrantable) -> iam.Grant:
        """Read each attempt's status.json (what the supervisor classifies an ended attempt by) and progress.json
        (a sweep member's intermediate values, runtime/sweeps.py), nothing else."""
        principal = grantee.grant_principal
        consumer = principal if isinstance(principal, Construct) else self
        statuses = (
            f"{as_seen_from(consumer, self.outputs_bucket, self.outputs_bucket.bucket_arn)}/"
            f"{naming.RUNS_PREFIX}*/attempts/*/status.json"
        )
        progress = statuses.replace("/status.json", "/progress.json")
        grant = iam.Grant.add_to_principal(
            grantee=grantee, actions=["s3:GetObject"], resource_arns=[statuses, progress]
        )
        if isinstance(principal, Construct):
            acknowledge_nag(
                principal,
                f"IAM5[Resource::{nag_name(principal, statuses)}]",
                "Reads only the status.json each attempt's agent writes, for runs and attempts made at run time.",
            )
            acknowledge_nag(
                principal,
                f"IAM5[Resource::{nag_name(principal, progress)}]",
                "Reads only the progress.json each attempt's agent writes (a sweep member's intermediate values).",
            )
        return grant

    def grant_write_run_spec(self, grantee: iam.IGrantable) -> iam.Grant:
        """Write each run's runs/<id>/spec.yaml (the run spec it was launched with), nothing else."""
        principal = grantee.grant_principal
        consumer = principal if isinstance(principal, Construct) else self
        specs = (
            f"{as_seen_from(consumer, self.outputs_bucket, self.outputs_bucket.bucket_arn)}/"
            f"{naming.RUNS_PREFIX}*/spec.yaml"
        )
        grant = iam.Grant.add_to_principal(grantee=grantee, actions=["s3:PutObject"], resource_arns=[specs])
        if isinstance(principal, Construct):
            acknowledge_nag(
                principal,
                f"IAM5[Resource::{nag_name(principal, specs)}]",
                "Writes only the spec.yaml of each run, whose ids are chosen at launch time.",
            )
        return grant


def _secure_bucket_defaults(removal: RemovalPolicy) -> dict:
    return {
        "block_public_access": s3.BlockPublicAccess.BLOCK_ALL,
        "enforce_ssl": True,
        "minimum_tls_version": 1.2,
        "versioned": True,
        "removal_policy": removal,
        "auto_delete_objects": False,  # never: a destroy must not delete data (and it needs a Lambda)
    }
