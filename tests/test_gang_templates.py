"""Gangs as deployed (issue 25): the supervisor's least privilege for placement groups, gang security groups, EFA
versions and node tags, the gang settings in its environment, and the gang network made from the stack's own
template."""

from __future__ import annotations

import pytest

from training_infra import naming
from training_infra.supervisor.runtime import gang


@pytest.fixture(scope="module")
def compute(synth):
    return synth("full").stack(naming.COMPUTE_STACK)


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _statements(compute, sid):
    role = compute.construct("Supervisor/Function").function.role
    found = [s for s in compute.role_statements(role) if s.get("Sid") == sid]
    assert len(found) == 1, sid
    return found[0]


def test_placement_groups_are_per_attempt_not_a_stack_resource(compute):
    assert compute.resources("AWS::EC2::PlacementGroup") == {}


def test_the_supervisor_makes_only_tagged_cluster_placement_groups_and_launches_into_and_deletes_only_those(compute):
    create = _statements(compute, "MakeClusterPlacementGroupsTagged")
    assert create["Action"] == "ec2:CreatePlacementGroup"
    assert create["Condition"] == {"StringEquals": {
        f"aws:RequestTag/{naming.TAG_CREATED_BY}": "supervisor", "ec2:PlacementGroupStrategy": "cluster"}}  # fmt: skip
    made_by_us = {"StringEquals": {f"aws:ResourceTag/{naming.TAG_CREATED_BY}": "supervisor"}}
    for sid, actions in (
        ("LaunchOnlyIntoPlacementGroupsItMade", ["ec2:CreateFleet", "ec2:RunInstances"]),
        ("DeleteOnlyPlacementGroupsItMade", ["ec2:DeletePlacementGroup"]),
        ("EfaVersionOfTemplatesItMade", ["ec2:CreateLaunchTemplateVersion"]),
    ):
        statement = _statements(compute, sid)
        assert sorted(_as_list(statement["Action"])) == actions and statement["Condition"] == made_by_us


def test_node_tags_go_only_on_the_projects_own_instances(compute):
    tagging = [
        s for s in compute.role_statements(compute.construct("Supervisor/Function").function.role)
        if "ec2:CreateTags" in _as_list(s["Action"]) and s.get("Sid") != "TagAtLaunch"
    ]  # fmt: skip
    assert len(tagging) == 1
    condition = tagging[0]["Condition"]
    assert condition["StringEquals"] == {f"aws:ResourceTag/{naming.TAG_MANAGED}": "true"}
    assert "ec2:InstanceProfile" in condition["ArnEquals"]


def test_the_supervisor_reads_efa_support_and_its_placement_groups(compute):
    read = _statements(compute, "ReadInstancesTemplatesAndSubnets")
    assert {"ec2:DescribeInstanceTypes", "ec2:DescribePlacementGroups"} <= set(read["Action"])


def test_the_supervisor_gets_the_gang_tags_and_settings_it_must_agree_on(compute):
    function = compute.construct("Supervisor/Function").function
    (resource,) = [
        r for key, r in compute.resources("AWS::Lambda::Function").items() if key == compute.logical_id(function)
    ]
    env = resource["Properties"]["Environment"]["Variables"]
    assert env["NODE_TAG"] == naming.TAG_NODE and env["NODES_TAG"] == naming.TAG_NODES
    assert env["RENDEZVOUS_TAG"] == naming.TAG_RENDEZVOUS
    assert env["MAX_NODES"] == "8" and env["GANG_REPLACE_SECONDS"] == "600"
    assert "PLACEMENT_STRATEGY" not in env, "AWS: cluster, the supervisor's default"


def test_the_gang_network_of_the_stack_template_is_both_groups_on_one_efa_interface_or_as_security_group_ids(compute):
    template = compute.construct("Compute").launch_template
    data = compute.json["Resources"][compute.logical_id(template)]["Properties"]["LaunchTemplateData"]
    (group,) = data["SecurityGroupIds"]
    groups = [group, "sg-0gang"]
    efa = gang.network_data(data, groups, efa=True)
    assert efa["NetworkInterfaces"] == [{
        "DeviceIndex": 0, "NetworkCardIndex": 0, "InterfaceType": "efa", "Groups": groups,
        "DeleteOnTermination": True,
    }]  # fmt: skip
    assert "SecurityGroupIds" not in efa
    assert {k: v for k, v in efa.items() if k != "NetworkInterfaces"} == {
        k: v for k, v in data.items() if k != "SecurityGroupIds"
    }
    assert "AssociatePublicIpAddress" not in efa["NetworkInterfaces"][0], "no public address: the subnet decides"
    plain = gang.network_data(data, groups, efa=False)
    assert plain == {**data, "SecurityGroupIds": groups}


def test_the_supervisor_makes_gang_security_groups_only_in_the_stacks_vpc_and_only_tagged(compute):
    vpc = compute.construct("Compute").vpc
    in_vpc = _statements(compute, "MakeGangSecurityGroupsInTheStacksVpc")
    assert in_vpc["Action"] == "ec2:CreateSecurityGroup" and "Condition" not in in_vpc
    assert {"Ref": compute.logical_id(vpc.node.default_child)} in in_vpc["Resource"]["Fn::Join"][1]
    tagged = _statements(compute, "MakeGangSecurityGroupsTagged")
    assert tagged["Action"] == "ec2:CreateSecurityGroup"
    assert tagged["Resource"]["Fn::Join"][1][-1].endswith(":security-group/*")
    assert tagged["Condition"] == {"StringEquals": {f"aws:RequestTag/{naming.TAG_CREATED_BY}": "supervisor"}}
    at_launch = _statements(compute, "TagAtLaunch")
    assert "CreateSecurityGroup" in at_launch["Condition"]["StringEquals"]["ec2:CreateAction"]


def test_the_supervisor_changes_rules_of_launches_into_and_deletes_only_the_gang_groups_it_made(compute):
    made_by_us = {f"aws:ResourceTag/{naming.TAG_CREATED_BY}": "supervisor"}
    rules = _statements(compute, "RulesAndDeleteOnlyOfGangGroupsItMade")
    assert sorted(rules["Action"]) == [
        "ec2:AuthorizeSecurityGroupEgress", "ec2:AuthorizeSecurityGroupIngress", "ec2:DeleteSecurityGroup",
        "ec2:RevokeSecurityGroupEgress", "ec2:RevokeSecurityGroupIngress",
    ]  # fmt: skip
    assert rules["Condition"]["StringEquals"] == made_by_us
    assert set(rules["Condition"]["ArnEquals"]) == {"ec2:Vpc"}
    launch = _statements(compute, "LaunchOnlyIntoGangGroupsItMade")
    assert launch["Action"] == "ec2:RunInstances" and launch["Condition"] == {"StringEquals": made_by_us}
    role = compute.construct("Supervisor/Function").function.role
    anywhere = [s for s in compute.role_statements(role) if s.get("Sid") not in (
        "RulesAndDeleteOnlyOfGangGroupsItMade", "MakeGangSecurityGroupsInTheStacksVpc", "MakeGangSecurityGroupsTagged")
        and {"ec2:CreateSecurityGroup", "ec2:DeleteSecurityGroup", "ec2:AuthorizeSecurityGroupIngress",
             "ec2:AuthorizeSecurityGroupEgress"} & set(_as_list(s["Action"]))]  # fmt: skip
    assert anywhere == []
    assert "ec2:DescribeSecurityGroups" in _statements(compute, "ReadInstancesTemplatesAndSubnets")["Action"]
