"""Upgrades never replace state: the logical ids below are a contract with every deployed account.

CloudFormation replaces a resource whose logical id changes. For a bucket or a repository that is
lost data; for the VPC and subnets it is a replaced network under a running training instance; for
a cross-stack export it is a deploy that fails ("export in use"). These ids are written out on
purpose, the one place the tests hold generated names: a refactor that moves a construct must keep
them (construct ids and nesting), and this test says which one moved.
"""

from __future__ import annotations

import pytest

from training_infra import naming

PINNED = {
    naming.STORAGE_STACK: {
        "StorageAccessLogsBucketFEE4D6FB": "AWS::S3::Bucket",
        "StorageDataBucketB1B922FA": "AWS::S3::Bucket",
        "StorageOutputsBucket49742862": "AWS::S3::Bucket",
        "RunTableEC064379": "AWS::DynamoDB::Table",
    },
    naming.REGISTRY_STACK: {
        "RegistryRepositoryC6C96DCD": "AWS::ECR::Repository",
        "RegistryGithubOidcProvider24942326": "AWS::IAM::OIDCProvider",
    },
    naming.COMPUTE_STACK: {
        "ComputeVpcDE29A423": "AWS::EC2::VPC",
        "ComputeVpcTrainingSubnet1Subnet7411BD95": "AWS::EC2::Subnet",
        "ComputeVpcTrainingSubnet2Subnet57C06DC4": "AWS::EC2::Subnet",
    },
}

# The compute stack imports these from storage; a renamed export cannot be deployed while in use.
PINNED_EXPORTS = {
    "TrainingInfra-Storage:ExportsOutputFnGetAttStorageDataBucketB1B922FAArn2EBC4078",
    "TrainingInfra-Storage:ExportsOutputFnGetAttStorageOutputsBucket49742862ArnCE1B3D81",
}


@pytest.mark.parametrize("stack", list(PINNED))
def test_stateful_resources_keep_the_logical_ids_deployed_accounts_have(synth, stack):
    resources = synth("full").templates[stack]["Resources"]
    for logical_id, resource_type in PINNED[stack].items():
        assert logical_id in resources, (
            f"{resource_type} {logical_id} would be replaced: its construct id or path changed"
        )
        assert resources[logical_id]["Type"] == resource_type


def test_storage_exports_the_compute_stack_imports_keep_their_names(synth):
    outputs = synth("full").templates[naming.STORAGE_STACK]["Outputs"]
    exported = {output["Export"]["Name"] for output in outputs.values() if "Export" in output}
    assert exported >= PINNED_EXPORTS, sorted(PINNED_EXPORTS - exported)
