"""The supervisor's gang decisions (issue 25) against moto, with the event shapes EventBridge delivers.

moto has no placement groups (CreatePlacementGroup is not implemented) and its fleets ignore
MinTargetCapacity, so `GangEc2` plays the placement-group calls in memory and records every request;
everything else (fleets, instances, tags, templates, status files, the run table) is moto's.
"""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError

from tests.supervisor.conftest import event
from training_infra.supervisor.runtime import gang
from training_infra.supervisor.runtime.records import AttemptEnd, MemberState, RunState, iso
from training_infra.supervisor.runtime.supervisor import SPOT_WARNING, STATE_CHANGE

EFA_TYPE, PLAIN_TYPE = "g5.12xlarge", "g5.xlarge"  # moto's DescribeInstanceTypes: EfaSupported true / false


class GangEc2:
    """The account's EC2 client, plus placement groups in memory; CreateFleet answers with capacity errors for the
    next `fail` requests (the shape CreateFleet documents), and every request is kept."""

    def __init__(self, ec2) -> None:
        self._ec2, self.fleets, self.groups, self.fail = ec2, [], {}, 0
        self.deleted: list[str] = []
        self.hide_new, self.hidden = False, set()  # instances DescribeInstances does not list yet

    def describe_instances(self, **request):
        if set(request.get("InstanceIds", [])) & self.hidden:
            raise ClientError({"Error": {"Code": "InvalidInstanceID.NotFound", "Message": "not yet"}}, "Describe")
        return self._ec2.describe_instances(**request)

    def __getattr__(self, name):
        return getattr(self._ec2, name)

    def create_placement_group(self, GroupName, Strategy, TagSpecifications=()):
        if GroupName in self.groups:
            raise ClientError({"Error": {"Code": "InvalidPlacementGroup.Duplicate", "Message": "exists"}}, "Create")
        tags = [t for spec in TagSpecifications for t in spec["Tags"]]
        self.groups[GroupName] = {"GroupName": GroupName, "Strategy": Strategy, "Tags": tags}
        return {"PlacementGroup": self.groups[GroupName]}

    def describe_placement_groups(self, Filters=()):
        wanted = {f["Name"][4:]: f["Values"] for f in Filters if f["Name"].startswith("tag:")}
        found = [
            g for g in self.groups.values()
            if all({t["Key"]: t["Value"] for t in g["Tags"]}.get(k) in v for k, v in wanted.items())
        ]  # fmt: skip
        return {"PlacementGroups": found}

    def delete_placement_group(self, GroupName):
        self.groups.pop(GroupName)
        self.deleted.append(GroupName)
        return {}

    def create_fleet(self, **request):
        self.fleets.append(request)
        if self.fail:
            self.fail -= 1
            template = request["LaunchTemplateConfigs"][0]
            return {"FleetId": "fleet-0123", "Instances": [], "Errors": [{
                "LaunchTemplateAndOverrides": {"LaunchTemplateSpecification": template["LaunchTemplateSpecification"],
                                               "Overrides": template["Overrides"][0]},
                "Lifecycle": request["TargetCapacitySpecification"]["DefaultTargetCapacityType"],
                "ErrorCode": "InsufficientInstanceCapacity", "ErrorMessage": "not enough capacity",
            }]}  # fmt: skip
        answer = self._ec2.create_fleet(**request)
        if self.hide_new:
            self.hidden |= {i for launched in answer.get("Instances", []) for i in launched["InstanceIds"]}
        return answer


@pytest.fixture
def gang_account(account):
    account.ec2_gang = GangEc2(account.ec2)
    gang._EFA_SUPPORT.clear()
    return account


def supervisor(account):
    return account.supervisor(ec2=account.ec2_gang)


def start_gang(account, nodes=3, types=(EFA_TYPE,), **spec):
    account.new_run(nodes=nodes, instance_types=list(types), **spec)
    supervisor(account).reconcile("bert")
    return account.run()


def tags_of(account, instance_id):
    instance = account.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return {t["Key"]: t["Value"] for t in instance["Tags"]}


def live(attempt):
    return {m.node: m for m in attempt.members if m.state == MemberState.RUNNING}


def lose(account, instance_id, *, warned=True):
    """A spot reclaim of one member: AWS's two-minute warning, then the instance goes away."""
    sv = supervisor(account)
    if warned:
        sv.handle(event(SPOT_WARNING, instance_id, **{"instance-action": "terminate"}))
    account.end_instance(instance_id)
    return supervisor(account).handle(event(STATE_CHANGE, instance_id, state="terminated"))


# --- launching ---------------------------------------------------------------------------------------


def test_a_gang_is_one_instant_fleet_of_n_all_or_nothing_in_one_pool_and_a_cluster_placement_group(gang_account):
    run = start_gang(gang_account, nodes=3)
    (request,) = gang_account.ec2_gang.fleets
    assert request["Type"] == "instant"
    assert request["TargetCapacitySpecification"]["TotalTargetCapacity"] == 3
    options = request["SpotOptions"]
    assert (options["MinTargetCapacity"], options["SingleInstanceType"], options["SingleAvailabilityZone"]) == (
        3, True, True)  # fmt: skip
    (override,) = request["LaunchTemplateConfigs"][0]["Overrides"]
    assert override["InstanceType"] == EFA_TYPE and override["SubnetId"] in gang_account.subnets.values()
    group = override["Placement"]["GroupName"]
    assert gang_account.ec2_gang.groups[group]["Strategy"] == "cluster"
    assert run.attempts[0].placement_group == group
    assert len(run.attempts[0].members) == 3 and len(gang_account.instances_of("bert")) == 3


def test_members_are_ordered_by_instance_id_and_tagged_with_their_node_and_node0s_rendezvous(gang_account):
    attempt = start_gang(gang_account, nodes=3).attempts[0]
    ids = [m.instance_id for m in attempt.members]
    assert ids == sorted(ids) and [m.node for m in attempt.members] == [0, 1, 2]
    host = attempt.members[0]
    assert attempt.instance_id == host.instance_id and host.private_ip
    for member in attempt.members:
        tags = tags_of(gang_account, member.instance_id)
        assert tags["training-infra:node"] == str(member.node)
        assert tags["training-infra:nodes"] == "3"
        assert tags["training-infra:rendezvous"] == f"{host.private_ip}:29400"
        assert tags["training-infra:attempt"] == "1"


def test_an_efa_type_launches_from_an_efa_version_of_the_runs_template_made_from_version_1(gang_account):
    attempt = start_gang(gang_account, nodes=2).attempts[0]
    (request,) = gang_account.ec2_gang.fleets
    spec = request["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]
    assert spec["Version"] == attempt.launch_template_version == "2"
    versions = {
        str(v["VersionNumber"]): v["LaunchTemplateData"]
        for v in gang_account.ec2.describe_launch_template_versions(LaunchTemplateId=spec["LaunchTemplateId"])[
            "LaunchTemplateVersions"
        ]
    }
    efa = versions["2"]
    assert "SecurityGroupIds" not in efa
    (interface,) = efa["NetworkInterfaces"]
    assert interface["InterfaceType"] == "efa" and interface["DeviceIndex"] == 0
    assert interface["Groups"] == [gang_account.security_group, attempt.security_group]
    assert efa["UserData"] == versions["1"]["UserData"] and efa["ImageId"] == versions["1"]["ImageId"]


def test_a_type_without_efa_launches_from_a_version_with_both_groups_and_no_efa_interface(gang_account):
    attempt = start_gang(gang_account, nodes=2, types=(PLAIN_TYPE,)).attempts[0]
    (request,) = gang_account.ec2_gang.fleets
    assert request["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]["Version"] == "2"
    assert attempt.launch_template_version == "2"
    versions = gang_account.ec2.describe_launch_template_versions(LaunchTemplateId=gang_account.template_id)
    data = {str(v["VersionNumber"]): v["LaunchTemplateData"] for v in versions["LaunchTemplateVersions"]}
    assert "NetworkInterfaces" not in data["2"]
    assert data["2"]["SecurityGroupIds"] == [gang_account.security_group, attempt.security_group]


def test_no_capacity_in_one_pool_sends_the_next_try_to_another_subnet_or_type(gang_account):
    gang_account.ec2_gang.fail = 1
    run = start_gang(gang_account, nodes=2, types=(EFA_TYPE, "g6.12xlarge"))
    first, second = gang_account.ec2_gang.fleets
    pool = lambda r: tuple(r["LaunchTemplateConfigs"][0]["Overrides"][0][k] for k in ("InstanceType", "SubnetId"))  # noqa: E731
    assert pool(first) != pool(second)
    assert len(run.attempts[0].members) == 2


def test_a_launch_that_died_after_its_fleet_returned_adopts_the_whole_gang(gang_account):
    run = start_gang(gang_account, nodes=2)
    ids = sorted(m.instance_id for m in run.attempts[0].members)
    run.attempts[0].instance_id, run.attempts[0].members = "", []
    supervisor(gang_account).store.save(run)
    supervisor(gang_account).reconcile("bert")
    assert sorted(m.instance_id for m in gang_account.run().attempts[0].members) == ids
    assert len(gang_account.ec2_gang.fleets) == 1, "no second gang"


# --- a lost member -----------------------------------------------------------------------------------------


def test_a_lost_non_host_is_replaced_in_the_same_pool_and_group_with_its_node_and_the_rendezvous(gang_account):
    attempt = start_gang(gang_account, nodes=3).attempts[0]
    lost = attempt.members[2]
    lose(gang_account, lost.instance_id)
    run = gang_account.run()
    assert len(run.attempts) == 1 and run.state != RunState.RECOVERING, "the same attempt goes on"
    nodes = live(run.attempts[0])
    assert sorted(nodes) == [0, 1, 2] and nodes[2].instance_id != lost.instance_id
    replaced = next(m for m in run.attempts[0].members if m.instance_id == lost.instance_id)
    assert replaced.state == MemberState.REPLACED and replaced.end_reason == AttemptEnd.RECLAIMED
    request = gang_account.ec2_gang.fleets[-1]
    assert request["TargetCapacitySpecification"]["TotalTargetCapacity"] == 1
    (override,) = request["LaunchTemplateConfigs"][0]["Overrides"]
    assert override["InstanceType"] == lost.instance_type and override["SubnetId"] == lost.subnet_id
    assert override["Placement"]["GroupName"] == attempt.placement_group
    tags = tags_of(gang_account, nodes[2].instance_id)
    assert tags["training-infra:node"] == "2" and tags["training-infra:attempt"] == "1"
    assert tags["training-infra:rendezvous"] == f"{attempt.members[0].private_ip}:29400"
    assert run.errors_used == 0, "a reclaim is a preemption, not an error"


def test_a_lost_host_stops_the_whole_gang_and_relaunches_it_as_the_next_attempt(gang_account):
    attempt = start_gang(gang_account, nodes=3).attempts[0]
    host, others = attempt.members[0], attempt.members[1:]
    lose(gang_account, host.instance_id)
    for member in others:
        assert tags_of(gang_account, member.instance_id)["training-infra:stop"] == "gang"
    assert gang_account.run().current.gang_ending == AttemptEnd.RECLAIMED
    for member in others:  # their agents stop gracefully and power off
        gang_account.end_instance(member.instance_id)
    supervisor(gang_account).reconcile("bert")
    run = gang_account.run()
    assert run.attempts[0].end_reason == AttemptEnd.RECLAIMED and run.errors_used == 0
    assert len(run.attempts) == 2 and len(live(run.attempts[1])) == 3
    assert {tags_of(gang_account, m.instance_id)["training-infra:attempt"] for m in run.attempts[1].members} == {"2"}
    assert f"{host.instance_type}@{host.zone}" in run.cooldown


def test_survivors_that_ignore_the_stop_are_terminated_after_the_grace(gang_account):
    attempt = start_gang(gang_account, nodes=2).attempts[0]
    lose(gang_account, attempt.members[0].instance_id)
    gang_account.clock.advance(seconds=supervisor(gang_account).cfg.stop_timeout_seconds + 1)
    supervisor(gang_account).reconcile("bert")
    state = gang_account.ec2.describe_instances(InstanceIds=[attempt.members[1].instance_id])["Reservations"][0][
        "Instances"
    ][0]["State"]["Name"]
    assert state in ("shutting-down", "terminated")


def test_no_replacement_within_gang_replace_timeout_relaunches_the_whole_gang(gang_account):
    attempt = start_gang(gang_account, nodes=2).attempts[0]
    gang_account.ec2_gang.fail = 100  # no capacity for the replacement
    lose(gang_account, attempt.members[1].instance_id)
    assert gang_account.run().current.replace_since, "waiting for a replacement"
    assert gang_account.run().current.gang_ending is None
    gang_account.clock.advance(seconds=supervisor(gang_account).cfg.gang_replace_seconds)
    supervisor(gang_account).reconcile("bert")
    run = gang_account.run()
    assert run.current.gang_ending == AttemptEnd.RECLAIMED
    assert "gang_replace_timeout" in run.current.gang_ending_words
    assert tags_of(gang_account, attempt.members[0].instance_id)["training-infra:stop"] == "gang"


def test_a_trainer_failure_on_any_node_ends_the_gang_attempt_as_an_error(gang_account):
    attempt = start_gang(gang_account, nodes=2, max_restarts_on_errors=1).attempts[0]
    member = attempt.members[1]
    status = {"outcome": "failed", "exit_code": 3, "ended_at": iso(gang_account.clock())}
    gang_account.s3.put_object(Bucket=gang_account.bucket, Key="runs/bert/attempts/1/nodes/1/status.json",
                               Body=json.dumps(status).encode())  # fmt: skip
    gang_account.end_instance(member.instance_id)
    supervisor(gang_account).reconcile("bert")
    gang_account.end_instance(attempt.members[0].instance_id)
    supervisor(gang_account).reconcile("bert")
    run = gang_account.run()
    assert run.attempts[0].end_reason == AttemptEnd.FAILED and run.errors_used == 1
    assert len(run.attempts) == 2, "restarted as a whole gang"


def test_a_survivor_failing_after_the_hosts_spot_notice_is_the_hosts_reclaim_not_an_error(gang_account):
    attempt = start_gang(gang_account, nodes=2, max_restarts_on_errors=1).attempts[0]
    host, survivor = attempt.members
    supervisor(gang_account).handle(event(SPOT_WARNING, host.instance_id, **{"instance-action": "terminate"}))
    # The survivor's torchrun loses the host's rendezvous store and its agent ends `failed` before the host is gone.
    status = {"outcome": "failed", "exit_code": 1, "ended_at": iso(gang_account.clock())}
    gang_account.s3.put_object(Bucket=gang_account.bucket, Key="runs/bert/attempts/1/nodes/1/status.json",
                               Body=json.dumps(status).encode())  # fmt: skip
    gang_account.end_instance(survivor.instance_id)
    supervisor(gang_account).handle(event(STATE_CHANGE, survivor.instance_id, state="terminated"))
    assert gang_account.run().current.gang_ending == AttemptEnd.RECLAIMED
    lose(gang_account, host.instance_id, warned=False)
    run = gang_account.run()
    assert run.attempts[0].end_reason == AttemptEnd.RECLAIMED and run.errors_used == 0
    assert len(run.attempts) == 2, "relaunched as a whole gang"


def test_a_spot_warning_is_noted_on_the_member_it_is_about(gang_account):
    attempt = start_gang(gang_account, nodes=2).attempts[0]
    supervisor(gang_account).handle(event(SPOT_WARNING, attempt.members[1].instance_id))
    members = gang_account.run().attempts[0].members
    assert members[1].reclaim_warned_at and not members[0].reclaim_warned_at


def test_stop_tags_every_member_and_the_run_ends_stopped(gang_account):
    attempt = start_gang(gang_account, nodes=2).attempts[0]
    supervisor(gang_account).request_stop("bert")
    for member in attempt.members:
        assert tags_of(gang_account, member.instance_id)["training-infra:stop"] == "user"
        gang_account.end_instance(member.instance_id)
    supervisor(gang_account).reconcile("bert")
    assert gang_account.run().state == RunState.STOPPED
    assert attempt.placement_group in gang_account.ec2_gang.deleted


# --- costs ---------------------------------------------------------------------------------------------


def test_a_gang_attempts_cost_is_the_sum_of_its_members_replaced_ones_included(gang_account):
    attempt = start_gang(gang_account, nodes=2, types=(PLAIN_TYPE,), market="on-demand").attempts[0]
    run = gang_account.run()
    price = run.spec.list_prices.get(PLAIN_TYPE)
    assert price is None  # the test's record has no list price: give the members the agent's estimate
    gang_account.clock.advance(hours=1)
    lose(gang_account, attempt.members[1].instance_id)
    gang_account.clock.advance(hours=1)
    for member in live(gang_account.run().attempts[0]).values():
        status = {"outcome": "succeeded", "exit_code": 0, "ended_at": iso(gang_account.clock()),
                  "hourly_price_usd": 2.0}  # fmt: skip
        key = f"runs/bert/attempts/1/nodes/{member.node}/status.json"
        gang_account.s3.put_object(Bucket=gang_account.bucket, Key=key, Body=json.dumps(status).encode())
        gang_account.end_instance(member.instance_id)
    supervisor(gang_account).reconcile("bert")
    ended = gang_account.run().attempts[0]
    assert ended.end_reason == AttemptEnd.SUCCEEDED
    members = {m.instance_id: m for m in ended.members}
    assert len(members) == 3 and all(m.priced for m in members.values())
    assert ended.cost_usd == pytest.approx(sum(m.cost_usd or 0 for m in members.values()))
    # host 2 h at $2, replacement 1 h at $2; the lost member wrote no status (no price known): nothing for it
    assert ended.cost_usd == pytest.approx(6.0, rel=0.01)


def test_the_open_gangs_spend_counts_every_live_member(gang_account):
    start_gang(gang_account, nodes=3, types=(PLAIN_TYPE,), market="on-demand")
    run = gang_account.run()
    sv = supervisor(gang_account)
    for member in run.current.members:
        member.price_usd = 1.0
    gang_account.clock.advance(hours=2)
    spent, hourly = sv._spend(run, run.current, gang_account.clock())
    assert spent == pytest.approx(6.0, rel=0.01) and hourly == pytest.approx(3.0, rel=0.01)


def test_the_gang_version_is_made_once_per_attempt_and_a_version_that_differs_is_never_launched(gang_account):
    run = gang_account.new_run(nodes=2, instance_types=[EFA_TYPE])
    template = run.spec.launch_template_id
    other_group = gang_account.ec2.create_security_group(GroupName="open", Description="someone else's")["GroupId"]
    gang_account.ec2.create_launch_template_version(  # someone else's version 2: EFA, but in another group
        LaunchTemplateId=template, SourceVersion="1",
        LaunchTemplateData={"NetworkInterfaces": [{"DeviceIndex": 0, "InterfaceType": "efa", "Groups": [other_group]}]},
    )  # fmt: skip
    supervisor(gang_account).reconcile("bert")
    (request,) = gang_account.ec2_gang.fleets
    assert request["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]["Version"] == "3"
    run = gang_account.run()
    sv = supervisor(gang_account)
    groups = [sv.cfg.security_group_id, run.attempts[0].security_group]
    assert gang.gang_template_version(sv.clients, run, sv.cfg, groups, efa=True) == "3", "the same one, not a new one"


def test_a_gang_waiting_for_capacity_tries_the_next_pools_each_minute(gang_account):
    gang_account.ec2_gang.fail = gang.MAX_TRIES_PER_RECONCILE
    run = start_gang(gang_account, nodes=2, types=(EFA_TYPE, "g6.12xlarge", "g5.24xlarge"))
    assert run.current is None and run.attempts[-1].end_reason == AttemptEnd.CAPACITY
    pool = lambda r: tuple(r["LaunchTemplateConfigs"][0]["Overrides"][0][k] for k in ("InstanceType", "SubnetId"))  # noqa: E731
    first_minute = [pool(r) for r in gang_account.ec2_gang.fleets]
    assert len(set(first_minute)) == gang.MAX_TRIES_PER_RECONCILE
    gang_account.clock.advance(minutes=1)
    supervisor(gang_account).reconcile("bert")
    next_pool = pool(gang_account.ec2_gang.fleets[-1])
    assert next_pool not in first_minute, "the next minute starts with pools not yet tried"
    assert len(gang_account.run().attempts[-1].members) == 2


def test_a_quiet_minute_of_a_running_gang_writes_nothing(gang_account):
    start_gang(gang_account, nodes=2)
    supervisor(gang_account).reconcile("bert")  # running now
    version = gang_account.run().version
    supervisor(gang_account).reconcile("bert")
    assert gang_account.run().version == version


def test_a_gang_ec2_does_not_list_yet_is_recorded_whole_and_tagged_at_the_next_reconcile(gang_account, monkeypatch):
    monkeypatch.setattr(gang, "DESCRIBE_PAUSE_SECONDS", 0)
    gang_account.ec2_gang.hide_new = True
    attempt = start_gang(gang_account, nodes=3).attempts[0]
    assert len(attempt.members) == 3 and [m.node for m in attempt.members] == [0, 1, 2]
    assert not attempt.members[0].private_ip
    assert "training-infra:rendezvous" not in tags_of(gang_account, attempt.members[0].instance_id)
    gang_account.ec2_gang.hidden.clear()
    supervisor(gang_account).reconcile("bert")
    members = gang_account.run().attempts[0].members
    host_ip = members[0].private_ip
    assert host_ip
    for member in members:
        tags = tags_of(gang_account, member.instance_id)
        assert tags["training-infra:node"] == str(member.node)
        assert tags["training-infra:rendezvous"] == f"{host_ip}:29400"


# --- a survivor's end while a replacement is pending (the survivors' rendezvous join_timeout) -------------


def end_with(account, member, outcome, **status):
    """Node `member.node`'s agent writes its status.json, then its instance ends (a survivor giving up)."""
    body = {"outcome": outcome, "exit_code": 1, "ended_at": iso(account.clock()), **status}
    account.s3.put_object(Bucket=account.bucket, Key=f"runs/bert/attempts/1/nodes/{member.node}/status.json",
                          Body=json.dumps(body).encode())  # fmt: skip
    account.end_instance(member.instance_id)
    supervisor(account).reconcile("bert")


def finish_gang(account):
    """The others stop on the stop tag and power off; the next reconcile ends the attempt."""
    for member in live(account.run().current).values():
        account.end_instance(member.instance_id)
    supervisor(account).reconcile("bert")
    return account.run()


def progress(account, node, changed_at):
    account.s3.put_object(Bucket=account.bucket, Key=f"runs/bert/attempts/1/nodes/{node}/progress.json",
                          Body=json.dumps({"step": 40, "changed_at": changed_at}).encode())  # fmt: skip


@pytest.mark.parametrize("outcome", ["failed", "stalled", "idle"])
def test_a_survivor_ending_before_the_replacement_joined_relaunches_the_gang_as_a_preemption(gang_account, outcome):
    attempt = start_gang(gang_account, nodes=3, max_restarts_on_errors=0).attempts[0]
    lose(gang_account, attempt.members[2].instance_id)
    assert len(live(gang_account.run().current)) == 3, "the replacement runs, the trainers have not met again"
    progress(gang_account, 2, "2026-01-01T00:00:00Z")  # the lost node's own last beat, from before the loss
    gang_account.clock.advance(seconds=1800)  # the survivor's rendezvous gave up (or it stalled, or idled)
    end_with(gang_account, attempt.members[1], outcome)
    current = gang_account.run().current
    assert (
        current.gang_ending == AttemptEnd.RECLAIMED and "had not joined the training yet" in current.gang_ending_words
    )
    run = finish_gang(gang_account)
    assert run.attempts[0].end_reason == AttemptEnd.RECLAIMED and run.errors_used == 0, "not the run's error"
    assert len(run.attempts) == 2 and len(live(run.attempts[1])) == 3, "relaunched whole as the next attempt"


def test_the_host_failing_while_no_replacement_is_running_yet_relaunches_the_gang_as_a_preemption(gang_account):
    attempt = start_gang(gang_account, nodes=2, max_restarts_on_errors=0).attempts[0]
    gang_account.ec2_gang.fail = 100  # no capacity for the replacement yet
    lose(gang_account, attempt.members[1].instance_id)
    end_with(gang_account, attempt.members[0], "failed")  # the last live member: the attempt ends at once
    run = gang_account.run()
    assert "node 1's replacement was not running yet" in run.attempts[0].message
    assert run.attempts[0].end_reason == AttemptEnd.RECLAIMED and run.errors_used == 0 and run.active
    assert len(run.attempts) == 2, "the next attempt (waiting for capacity here)"


def test_a_survivor_failing_after_the_replacement_trained_with_the_gang_is_the_runs_error(gang_account):
    attempt = start_gang(gang_account, nodes=3, max_restarts_on_errors=0).attempts[0]
    lose(gang_account, attempt.members[2].instance_id)
    replacement = live(gang_account.run().current)[2]
    gang_account.clock.advance(seconds=120)
    progress(gang_account, 2, iso(gang_account.clock()))  # the replacement's first beat: the gang met again
    end_with(gang_account, attempt.members[1], "failed")
    assert gang_account.run().current.gang_ending == AttemptEnd.FAILED
    run = finish_gang(gang_account)
    assert run.attempts[0].end_reason == AttemptEnd.FAILED and run.state == RunState.FAILED
    assert replacement.instance_id in {m.instance_id for m in run.attempts[0].members}


def test_a_survivor_failing_after_the_rendezvous_window_is_the_runs_error_even_without_heartbeats(gang_account):
    attempt = start_gang(gang_account, nodes=3, max_restarts_on_errors=0).attempts[0]
    lose(gang_account, attempt.members[2].instance_id)
    cfg = supervisor(gang_account).cfg
    window = cfg.gang_replace_seconds + gang.AGENT_JOIN_MARGIN_SECONDS + cfg.stop_timeout_seconds
    gang_account.clock.advance(seconds=window + 60)  # a trainer that writes no heartbeat: only time tells
    end_with(gang_account, attempt.members[1], "failed")
    assert gang_account.run().current.gang_ending == AttemptEnd.FAILED


def test_the_supervisors_rendezvous_window_is_the_agents_join_timeout_at_the_agents_defaults():
    from training_infra.compute.agent.ti_agent import gang as agent_gang
    from training_infra.compute.agent.ti_agent.settings import Knobs

    knobs = Knobs()
    agent = agent_gang.join_timeout_seconds(knobs.gang_replace_seconds, knobs.pull_timeout_seconds)
    assert agent == knobs.gang_replace_seconds + gang.AGENT_JOIN_MARGIN_SECONDS


# --- a replacement's own end before it joined (the second review, SHOULD 5) --------------------------------------


def test_a_replacement_failing_before_it_joined_relaunches_the_gang_as_a_preemption(gang_account):
    attempt = start_gang(gang_account, nodes=3, max_restarts_on_errors=0).attempts[0]
    lose(gang_account, attempt.members[2].instance_id)
    replacement = live(gang_account.run().current)[2]
    progress(gang_account, 2, "2026-01-01T00:00:00Z")  # the lost node's own last beat, from before the loss
    gang_account.clock.advance(seconds=1900)  # its image pull timed out (the agent's bound: 1800 s)
    end_with(gang_account, replacement, "failed", message="image pull timed out after 1800 s")
    current = gang_account.run().current
    assert current.gang_ending == AttemptEnd.RECLAIMED
    assert f"node 2's replacement ({replacement.instance_id}) ended" in current.gang_ending_words
    assert "before it joined the training" in current.gang_ending_words
    for member in (attempt.members[0], attempt.members[1]):
        assert tags_of(gang_account, member.instance_id)["training-infra:stop"] == "gang"
    run = finish_gang(gang_account)
    assert run.attempts[0].end_reason == AttemptEnd.RECLAIMED and run.errors_used == 0, "not the run's error"
    assert len(run.attempts) == 2 and len(live(run.attempts[1])) == 3, "relaunched whole as the next attempt"


def test_a_replacement_failing_after_it_trained_with_the_gang_is_the_runs_error(gang_account):
    attempt = start_gang(gang_account, nodes=3, max_restarts_on_errors=0).attempts[0]
    lose(gang_account, attempt.members[2].instance_id)
    replacement = live(gang_account.run().current)[2]
    gang_account.clock.advance(seconds=300)
    progress(gang_account, 2, iso(gang_account.clock()))  # the replacement's first beat: the gang met again
    gang_account.clock.advance(seconds=60)
    end_with(gang_account, replacement, "failed")
    assert gang_account.run().current.gang_ending == AttemptEnd.FAILED
    run = finish_gang(gang_account)
    assert run.attempts[0].end_reason == AttemptEnd.FAILED and run.state == RunState.FAILED


def test_a_first_launch_member_failing_at_its_start_is_the_runs_error_not_a_replacement(gang_account):
    """Only a replacement's end is the replacement path: a persistent fault fails the next attempt's nodes as errors."""
    attempt = start_gang(gang_account, nodes=2, max_restarts_on_errors=0).attempts[0]
    gang_account.clock.advance(seconds=60)
    end_with(gang_account, attempt.members[1], "failed", message="image pull timed out after 1800 s")
    assert gang_account.run().current.gang_ending == AttemptEnd.FAILED
