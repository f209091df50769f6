"""Data and outputs buckets: the only state that matters, so it outlives every other stack."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from training_infra import naming
from training_infra.config import Settings
from training_infra.policy import acknowledge_nag, skip_checkov


class TrainingStorage(Construct):
    """Encrypted, versioned, TLS-only buckets with lifecycle rules a cost-conscious team expects."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id)
        removal = RemovalPolicy.RETAIN if settings.retain_data else RemovalPolicy.DESTROY
        noncurrent = Duration.days(settings.noncurrent_version_days)
        abort_uploads = s3.LifecycleRule(id="AbortIncompleteUploads", abort_incomplete_multipart_upload_after=Duration.days(7))

        self.access_logs_bucket = s3.Bucket(
            self,
            "AccessLogsBucket",
            **_secure_bucket_defaults(removal),
            # Server access logging can only deliver to SSE-S3 buckets.
            encryption=s3.BucketEncryption.S3_MANAGED,
            lifecycle_rules=[
                abort_uploads,
                s3.LifecycleRule(id="ExpireAccessLogs", expiration=Duration.days(365), noncurrent_version_expiration=noncurrent),
            ],
        )
        skip_checkov(self.access_logs_bucket, "CKV_AWS_18", "This is the access-log bucket; logging it into itself would loop")
        acknowledge_nag(self.access_logs_bucket, "S1", "This is the server access log destination; logging it into itself would loop")

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
                    transitions=[s3.Transition(storage_class=s3.StorageClass.INTELLIGENT_TIERING, transition_after=Duration.days(0))],
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
                        s3.Transition(storage_class=s3.StorageClass.INFREQUENT_ACCESS, transition_after=Duration.days(30)),
                        s3.Transition(storage_class=s3.StorageClass.GLACIER_INSTANT_RETRIEVAL, transition_after=Duration.days(90)),
                    ],
                ),
                # Checkpoints only matter while a run can still resume.
                s3.LifecycleRule(
                    id="ExpireCheckpoints",
                    prefix=naming.CHECKPOINTS_PREFIX,
                    expiration=Duration.days(settings.checkpoint_retention_days),
                    noncurrent_version_expiration=Duration.days(1),
                ),
            ],
        )

    def grant_run_access(self, grantee: iam.IGrantable) -> None:
        """What a training instance needs, by prefix and exact action: read data/, write runs/ and checkpoints/."""
        statements = [
            iam.PolicyStatement(sid="ListDataPrefix", actions=["s3:ListBucket"], resources=[self.data_bucket.bucket_arn],
                                conditions={"StringLike": {"s3:prefix": [naming.DATA_PREFIX, f"{naming.DATA_PREFIX}*"]}}),
            iam.PolicyStatement(sid="ReadData", actions=["s3:GetObject"], resources=[self.data_bucket.arn_for_objects(f"{naming.DATA_PREFIX}*")]),
            iam.PolicyStatement(sid="ListRunsAndCheckpoints", actions=["s3:ListBucket"], resources=[self.outputs_bucket.bucket_arn],
                                conditions={"StringLike": {"s3:prefix": [f"{naming.RUNS_PREFIX}*", f"{naming.CHECKPOINTS_PREFIX}*"]}}),
            iam.PolicyStatement(
                sid="ReadWriteRunsAndCheckpoints",
                actions=["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
                resources=[self.outputs_bucket.arn_for_objects(f"{naming.RUNS_PREFIX}*"), self.outputs_bucket.arn_for_objects(f"{naming.CHECKPOINTS_PREFIX}*")],
            ),
            # `aws s3 sync --delete` keeps runs/latest/ a copy of the newest finished run, and checkpoints/<run>/
            # a mirror of what the trainer keeps (versioning still holds what a sync deletes).
            iam.PolicyStatement(
                sid="MirrorLatestRunAndCheckpoints",
                actions=["s3:DeleteObject"],
                resources=[self.outputs_bucket.arn_for_objects(f"{naming.LATEST_PREFIX}*"), self.outputs_bucket.arn_for_objects(f"{naming.CHECKPOINTS_PREFIX}*")],
            ),
        ]
        for statement in statements:
            grantee.grant_principal.add_to_principal_policy(statement)


def _secure_bucket_defaults(removal: RemovalPolicy) -> dict:
    return {
        "block_public_access": s3.BlockPublicAccess.BLOCK_ALL,
        "enforce_ssl": True,
        "minimum_tls_version": 1.2,
        "versioned": True,
        "removal_policy": removal,
        "auto_delete_objects": False,  # never: a destroy must not delete data (and it needs a Lambda)
    }
