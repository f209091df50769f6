"""A gang's network (issue 25): a security group per attempt that lets its members reach each other and nothing else.

Against moto, which keeps security groups and their rules as EC2 does. Two things it does not do are played:
its fleets ignore the groups a launch-template version names (so "members carry both groups" is asserted on the
version each fleet request launches from, which is what EC2 applies), and it deletes a group at once where EC2
refuses while a terminated member's interface lingers (`LingeringEc2`: DependencyViolation, as EC2 answers).
"""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from tests.supervisor.test_gang import EFA_TYPE, PLAIN_TYPE, GangEc2, live, lose, start_gang, supervisor
from training_infra import naming
from training_infra.supervisor.runtime import gang
from training_infra.supervisor.runtime.records import RunState

EVERYTHING = ("0.0.0.0/0", "::/0")


class LingeringEc2(GangEc2):
    """DeleteSecurityGroup refused `linger` times, as EC2 refuses while an ended member's interface detaches."""

    def __init__(self, ec2) -> None:
        super().__init__(ec2)
        self.linger = 0

    def delete_security_group(self, GroupId):
        if self.linger:
            self.linger -= 1
            answer = {"Code": "DependencyViolation", "Message": f"resource {GroupId} has a dependent object"}
            raise ClientError({"Error": answer}, "DeleteSecurityGroup")
        return self._ec2.delete_security_group(GroupId=GroupId)


@pytest.fixture
def gang_account(account):
    account.ec2_gang = LingeringEc2(account.ec2)
    gang._EFA_SUPPORT.clear()
    return account


def group(account, group_id):
    (found,) = account.ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    return found


def gang_groups(account):
    return account.ec2.describe_security_groups(
        Filters=[{"Name": f"tag:{naming.TAG_CREATED_BY}", "Values": ["supervisor"]}]
    )["SecurityGroups"]


def version_data(account, version):
    (found,) = account.ec2.describe_launch_template_versions(LaunchTemplateId=account.template_id,
                                                             Versions=[version])["LaunchTemplateVersions"]  # fmt: skip
    return found["LaunchTemplateData"]


def launched_groups(account, request):
    """The groups EC2 gives the instances of one fleet request: those of the template version it names."""
    data = version_data(account, request["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]["Version"])
    return [g for i in data.get("NetworkInterfaces", []) for g in i["Groups"]] or data["SecurityGroupIds"]


def assert_only_self_rules(found):
    me = found["GroupId"]
    for permissions in (found["IpPermissions"], found["IpPermissionsEgress"]):
        (rule,) = permissions
        assert rule["IpProtocol"] == "-1" and [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [me]
        assert not rule.get("IpRanges") and not rule.get("Ipv6Ranges") and not rule.get("PrefixListIds")


def test_a_gang_attempt_gets_a_group_in_the_stacks_vpc_tagged_with_only_self_rules_and_no_egress_to_anywhere(
    gang_account,
):
    attempt = start_gang(gang_account, nodes=3).attempts[0]
    found = group(gang_account, attempt.security_group)
    assert found["VpcId"] == group(gang_account, gang_account.security_group)["VpcId"]
    tags = {t["Key"]: t["Value"] for t in found["Tags"]}
    assert tags[naming.TAG_CREATED_BY] == "supervisor" and tags[naming.TAG_RUN_ID] == "bert"
    assert tags[naming.TAG_ATTEMPT] == "1"
    assert_only_self_rules(found)
    text = str(found)
    assert not any(cidr in text for cidr in EVERYTHING), "EC2's default allow-all egress is revoked"


@pytest.mark.parametrize("instance_type", [EFA_TYPE, PLAIN_TYPE])
def test_every_member_launches_with_the_stacks_group_and_its_attempts_group(gang_account, instance_type):
    attempt = start_gang(gang_account, nodes=2, types=(instance_type,)).attempts[0]
    (request,) = gang_account.ec2_gang.fleets
    assert launched_groups(gang_account, request) == [gang_account.security_group, attempt.security_group]


def test_a_replacement_joins_the_same_attempts_group(gang_account):
    attempt = start_gang(gang_account, nodes=3).attempts[0]
    lose(gang_account, attempt.members[2].instance_id)
    run = gang_account.run()
    assert len(run.attempts) == 1 and 2 in live(run.attempts[0])
    replacement = gang_account.ec2_gang.fleets[-1]
    assert replacement["TargetCapacitySpecification"]["TotalTargetCapacity"] == 1
    assert launched_groups(gang_account, replacement) == [gang_account.security_group, attempt.security_group]
    assert [g["GroupId"] for g in gang_groups(gang_account)] == [attempt.security_group], "no second group"


def test_a_replacement_joins_its_attempts_group_whatever_version_the_record_names(gang_account):
    run = start_gang(gang_account, nodes=2)
    attempt = run.attempts[0]
    joined = attempt.launch_template_version
    run.attempts[0].launch_template_version = "1"  # the stack's group alone: the replacement would reach no member
    supervisor(gang_account).store.save(run)
    lose(gang_account, attempt.members[1].instance_id)
    replacement = gang_account.ec2_gang.fleets[-1]
    assert replacement["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]["Version"] == joined
    assert launched_groups(gang_account, replacement) == [gang_account.security_group, attempt.security_group]


def test_the_next_attempt_gets_a_new_group_and_the_ended_attempts_group_is_deleted(gang_account):
    first = start_gang(gang_account, nodes=2).attempts[0]
    lose(gang_account, first.members[0].instance_id)  # the host: the whole gang relaunches
    gang_account.end_instance(first.members[1].instance_id)
    supervisor(gang_account).reconcile_all()  # the next gang, then the minute's sweep
    run = gang_account.run()
    second = run.attempts[1]
    assert second.security_group and second.security_group != first.security_group
    assert [g["GroupId"] for g in gang_groups(gang_account)] == [second.security_group]
    assert launched_groups(gang_account, gang_account.ec2_gang.fleets[-1])[-1] == second.security_group
    assert_only_self_rules(group(gang_account, second.security_group))


def test_a_group_ec2_still_refuses_to_delete_is_deleted_by_a_later_minutes_sweep(gang_account):
    attempt = start_gang(gang_account, nodes=2).attempts[0]
    supervisor(gang_account).request_stop("bert")
    gang_account.ec2_gang.linger = 2  # the ended members' interfaces detach over the next minutes
    for member in attempt.members:
        gang_account.end_instance(member.instance_id)
    supervisor(gang_account).reconcile_all()
    assert gang_account.run().state == RunState.STOPPED
    assert [g["GroupId"] for g in gang_groups(gang_account)] == [attempt.security_group], "refused: kept for now"
    supervisor(gang_account).reconcile_all()
    assert gang_groups(gang_account) != [], "still refused"
    supervisor(gang_account).reconcile_all()
    assert gang_groups(gang_account) == []


def test_a_crashed_launchs_half_made_group_is_completed_to_only_self_rules_not_duplicated(gang_account):
    run = gang_account.new_run(nodes=2, instance_types=[EFA_TYPE])
    vpc = group(gang_account, gang_account.security_group)["VpcId"]
    tags = [{"Key": naming.TAG_CREATED_BY, "Value": "supervisor"}, {"Key": naming.TAG_RUN_ID, "Value": "bert"},
            {"Key": naming.TAG_ATTEMPT, "Value": "1"}]  # fmt: skip
    made = gang_account.ec2.create_security_group(  # created, then the supervisor died: EC2's default egress only
        GroupName=f"{naming.RUN_TEMPLATE_PREFIX}{run.run_id}-1", Description="half made", VpcId=vpc,
        TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}],
    )["GroupId"]  # fmt: skip
    ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    gang_account.ec2.authorize_security_group_ingress(GroupId=made, IpPermissions=[ssh])  # a rule nobody should add
    # The self egress rule was added before the crash: EC2 lists it with the default egress as one permission.
    self_rule = {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": made}]}
    gang_account.ec2.authorize_security_group_egress(GroupId=made, IpPermissions=[self_rule])
    (merged,) = group(gang_account, made)["IpPermissionsEgress"]
    assert merged["IpRanges"] and merged["UserIdGroupPairs"]
    supervisor(gang_account).reconcile("bert")
    assert gang_account.run().attempts[0].security_group == made
    assert_only_self_rules(group(gang_account, made))
    assert len(gang_groups(gang_account)) == 1


def test_a_group_of_the_attempts_name_the_supervisor_did_not_make_is_never_launched_into(gang_account):
    run = gang_account.new_run(nodes=2, instance_types=[EFA_TYPE])
    vpc = group(gang_account, gang_account.security_group)["VpcId"]
    gang_account.ec2.create_security_group(GroupName=f"{naming.RUN_TEMPLATE_PREFIX}{run.run_id}-1",
                                           Description="someone else's", VpcId=vpc)  # fmt: skip
    supervisor(gang_account).reconcile("bert")
    run = gang_account.run()
    assert run.state == RunState.FAILED and gang_account.ec2_gang.fleets == []
    assert "was not made by the supervisor" in run.message


def test_the_sweep_deletes_only_groups_the_supervisor_made_that_no_open_attempt_needs(gang_account):
    attempt = start_gang(gang_account, nodes=2).attempts[0]
    vpc = group(gang_account, gang_account.security_group)["VpcId"]

    def made(name, **tags):
        spec = [{"ResourceType": "security-group", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
        return gang_account.ec2.create_security_group(GroupName=name, Description="x", VpcId=vpc,
                                                      TagSpecifications=spec)["GroupId"]  # fmt: skip

    ours = {naming.TAG_CREATED_BY: "supervisor"}
    orphan = made("orphan", **ours, **{naming.TAG_RUN_ID: "gone", naming.TAG_ATTEMPT: "1"})  # no record
    ended = made("ended", **ours, **{naming.TAG_RUN_ID: "bert", naming.TAG_ATTEMPT: "7"})  # no such attempt
    next_claim = made("next", **ours, **{naming.TAG_RUN_ID: "bert", naming.TAG_ATTEMPT: "2"})  # a capacity wait's
    foreign = made("foreign", **{naming.TAG_RUN_ID: "bert", naming.TAG_ATTEMPT: "1"})  # not the supervisor's
    deleted = gang.sweep_security_groups(supervisor(gang_account))
    assert sorted(deleted) == sorted([orphan, ended])
    left = {g["GroupId"] for g in gang_account.ec2.describe_security_groups()["SecurityGroups"]}
    assert {attempt.security_group, next_claim, foreign, gang_account.security_group} <= left


def test_a_single_node_run_gets_no_group_of_its_own(gang_account):
    gang_account.new_run(instance_types=[EFA_TYPE])
    supervisor(gang_account).reconcile("bert")
    assert gang_account.run().current.instance_id
    assert gang_groups(gang_account) == []
