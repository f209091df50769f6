"""The run table and the supervisor as deployed: retained records, the triggers, and least privilege."""

from __future__ import annotations

import json

import pytest
from aws_cdk.assertions import Match

from training_infra import naming
from training_infra.supervisor.runtime import capacity


@pytest.fixture(scope="module")
def storage(synth):
    return synth("full").stack(naming.STORAGE_STACK)


@pytest.fixture(scope="module")
def compute(synth):
    return synth("full").stack(naming.COMPUTE_STACK)


@pytest.fixture(scope="module")
def supervisor(compute):
    return compute.construct("Supervisor")


def _as_list(value):
    return value if isinstance(value, list) else [value]


def test_run_records_outlive_compute_cost_nothing_at_rest_and_can_be_restored(storage):
    storage.template.has_resource(
        "AWS::DynamoDB::Table",
        {
            "DeletionPolicy": "Retain",
            "UpdateReplacePolicy": "Retain",
            "Properties": Match.object_like(
                {
                    "BillingMode": "PAY_PER_REQUEST",
                    "DeletionProtectionEnabled": True,
                    "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
                    "SSESpecification": {"SSEEnabled": True},
                }
            ),
        },
    )
    assert naming.OUTPUT_RUN_TABLE in storage.json["Outputs"]


def test_run_table_indexes_serve_the_reconcile_and_newest_first_listing(storage):
    storage.template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "GlobalSecondaryIndexes": Match.array_with(
                [
                    Match.object_like(
                        {"IndexName": "Active", "KeySchema": [{"AttributeName": "active", "KeyType": "HASH"}]}
                    ),
                    Match.object_like(
                        {
                            "IndexName": "ByCreated",
                            "KeySchema": [
                                {"AttributeName": "kind", "KeyType": "HASH"},
                                {"AttributeName": "created_at", "KeyType": "RANGE"},
                            ],
                        }
                    ),
                ]
            )
        },
    )


def test_supervisor_reacts_to_instance_states_spot_warnings_and_a_one_minute_reconcile(compute, supervisor):
    function_arn = {"Fn::GetAtt": [compute.logical_id(supervisor.function.function), "Arn"]}
    compute.template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "source": ["aws.ec2"],
                "detail-type": ["EC2 Instance State-change Notification"],
                "detail": {"state": ["running", "stopping", "stopped", "shutting-down", "terminated"]},
            },
            "Targets": [Match.object_like({"Arn": function_arn})],
        },
    )
    compute.template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "source": ["aws.ec2"],
                "detail-type": ["EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation"],
            },
            "Targets": [Match.object_like({"Arn": function_arn})],
        },
    )
    compute.template.has_resource_properties(
        "AWS::Events::Rule",
        {"ScheduleExpression": "rate(1 minute)", "Targets": [Match.object_like({"Arn": function_arn})]},
    )
    compute.template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {"source": ["aws.ec2"], "detail-type": list(capacity.BLOCK_EXPIRING)},
            "Targets": [Match.object_like({"Arn": function_arn})],
        },
    )


def test_supervisor_gets_the_table_bucket_and_tag_names_it_must_agree_on(compute, supervisor):
    env = compute.json["Resources"][compute.logical_id(supervisor.function.function)]["Properties"]["Environment"][
        "Variables"
    ]
    assert env["ATTEMPT_TAG"] == naming.TAG_ATTEMPT and env["STOP_TAG"] == naming.TAG_STOP
    assert env["RUN_ID_TAG"] == naming.TAG_RUN_ID and env["MANAGED_TAG"] == naming.TAG_MANAGED
    assert "Fn::ImportValue" in env["TABLE"] and "Fn::ImportValue" in env["OUTPUTS_BUCKET"]


@pytest.mark.parametrize("function", ["function", "requests"])
def test_supervisor_launches_only_its_own_templates_the_projects_profile_types_and_network(
    compute, supervisor, function
):
    statements = {s["Sid"]: s for s in compute.role_statements(getattr(supervisor, function).role) if "Sid" in s}
    made_by_us = {"StringEquals": {f"aws:ResourceTag/{naming.TAG_CREATED_BY}": "supervisor"}}
    compute_construct = compute.construct("Compute")
    profile = {"Fn::GetAtt": [compute.logical_id(compute_construct.instance_profile), "Arn"]}
    assert statements["LaunchOnlyFromTemplatesItMade"]["Condition"] == made_by_us
    assert statements["DeleteOnlyTemplatesItMade"]["Condition"] == made_by_us
    assert statements["MakeRunTemplatesTagged"]["Condition"] == {
        "StringEquals": {f"aws:RequestTag/{naming.TAG_CREATED_BY}": "supervisor"}
    }
    instances = statements["LaunchOnlyProjectInstances"]
    assert instances["Condition"]["StringEquals"] == {f"aws:RequestTag/{naming.TAG_MANAGED}": "true"}
    assert instances["Condition"]["ArnEquals"] == {"ec2:InstanceProfile": profile}
    assert "p5.*" not in instances["Condition"]["StringLike"]["ec2:InstanceType"]
    assert "g5.*" in instances["Condition"]["StringLike"]["ec2:InstanceType"]
    ending = statements["StopAndEndOnlyProjectInstances"]
    assert ending["Condition"] == {
        "StringEquals": {f"aws:ResourceTag/{naming.TAG_MANAGED}": "true"},
        "ArnEquals": {"ec2:InstanceProfile": profile},
    }
    subnets = _as_list(statements["LaunchOnlyIntoTheStacksNetwork"]["Resource"])
    assert len(subnets) == len(compute_construct.subnet_ids) and all("subnet/" in str(r) for r in subnets)
    assert "security-group/" in str(statements["LaunchOnlyWithTheStacksSecurityGroup"]["Resource"])
    assert statements["ImageOnlyFromTheTemplate"]["Condition"] == {"Bool": {"ec2:IsLaunchTemplateResource": "true"}}
    image_grants = [s for s in statements.values() if any("image/" in str(r) for r in _as_list(s["Resource"]))]
    assert {s["Sid"] for s in image_grants if "ec2:RunInstances" in _as_list(s["Action"])} == {
        "ImageOnlyFromTheTemplate"
    }, "RunInstances gets an image only from the launch template"
    pass_role = statements["PassOnlyTheInstanceRole"]
    assert pass_role["Resource"] == {"Fn::GetAtt": [compute.logical_id(compute_construct.role), "Arn"]}
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    assert "ec2:ImageID" in statements["FleetImageOfItsTemplate"]["Condition"]["StringEquals"], "a fleet's image"
    # Nothing unconditioned on a launch template, an instance or an image; no subnet or group but the stack's.
    for statement in statements.values():
        for resource in _as_list(statement["Resource"]):
            text = str(resource)
            if any(kind in text for kind in ("launch-template/", "instance/", "image/")):
                assert statement.get("Condition"), statement
            if "subnet/" in text or "security-group/" in text:
                assert not text.endswith(("subnet/*", "security-group/*")), statement


@pytest.mark.parametrize("function", ["function", "requests"])
def test_supervisor_learns_the_stacks_limits_from_its_environment(compute, supervisor, function):
    env = compute.json["Resources"][compute.logical_id(getattr(supervisor, function).function)]["Properties"][
        "Environment"
    ]["Variables"]
    compute_construct = compute.construct("Compute")
    assert env["LAUNCH_TEMPLATE_ID"] == {"Ref": compute.logical_id(compute_construct.launch_template)}
    assert env["INSTANCE_PROFILE_ARN"] == {
        "Fn::GetAtt": [compute.logical_id(compute_construct.instance_profile), "Arn"]
    }
    assert env["ALLOWED_INSTANCE_TYPES"].split(",")[0] == "g4dn.*" and "p5" not in env["ALLOWED_INSTANCE_TYPES"]
    assert env["MAX_RUNTIME_HOURS"] and env["SUBNET_IDS"] and env["SECURITY_GROUP_ID"]
    assert env["RUN_TEMPLATE_PREFIX"] == naming.RUN_TEMPLATE_PREFIX and env["CREATED_BY_TAG"] == naming.TAG_CREATED_BY
    # The stack template's AMI, and the roles a run template's CreatedBy must name: both functions', each one's.
    assert env["IMAGE_ID"], "the default version's image is checked against the deployed one"
    roles = {compute.logical_id(getattr(supervisor, name).role) for name in ("function", "requests")}
    assert {part["Ref"] for part in env["TEMPLATE_CREATORS"]["Fn::Join"][1]} == roles


def _user_policy(compute):
    [(logical_id, policy)] = [
        (lid, r)
        for lid, r in compute.resources("AWS::IAM::ManagedPolicy").items()
        if "CLI users" in r["Properties"].get("Description", "")
    ]
    return logical_id, policy["Properties"]["PolicyDocument"]["Statement"]


def test_the_training_user_policy_invokes_the_supervisor_and_reads_but_writes_no_run_template_or_instance(
    compute, supervisor
):
    logical_id, statements = _user_policy(compute)
    actions = {a for s in statements for a in _as_list(s["Action"])}
    for forbidden in ("dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "ec2:CreateLaunchTemplate",
                      "ec2:CreateLaunchTemplateVersion", "ec2:CreateFleet", "ec2:RunInstances", "iam:PassRole",
                      "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DeleteLaunchTemplate"):  # fmt: skip
        assert forbidden not in actions
    assert all(s["Effect"] == "Allow" for s in statements)
    (invoke,) = [s for s in statements if s["Action"] == "lambda:InvokeFunction"]
    assert invoke["Resource"] == {"Fn::GetAtt": [compute.logical_id(supervisor.requests.function), "Arn"]}, (
        "the request function only: EventBridge alone hands the event-driven function its events"
    )
    (shell,) = [s for s in statements if s.get("Sid") == "ShellIntoRunInstances"]
    assert shell["Condition"] == {"StringEquals": {f"aws:ResourceTag/{naming.TAG_MANAGED}": "true"}}
    for statement in statements:
        if statement["Resource"] == "*":
            assert all(a.startswith("ec2:Describe") or a in ("servicequotas:GetServiceQuota", "pricing:GetProducts",
                                                             "ec2:GetSpotPlacementScores")
                       for a in _as_list(statement["Action"])), statement  # fmt: skip
    outputs = compute.json["Outputs"]
    assert outputs[naming.OUTPUT_TRAINING_USER_POLICY_ARN]["Value"] == {"Ref": logical_id}
    assert naming.OUTPUT_SUPERVISOR_FUNCTION in outputs and naming.OUTPUT_ALLOWED_INSTANCE_TYPES in outputs


def test_supervisor_may_read_spot_and_list_prices_for_price_caps(compute, supervisor):
    statements = compute.role_statements(supervisor.function.role)
    allowed = {action for statement in statements for action in _as_list(statement["Action"])}
    assert {"ec2:DescribeSpotPriceHistory", "pricing:GetProducts"} <= allowed
    (list_prices,) = [s for s in statements if "pricing:GetProducts" in _as_list(s["Action"])]
    assert _as_list(list_prices["Action"]) == ["pricing:GetProducts"] and list_prices["Resource"] == "*"


def test_supervisor_and_cli_user_may_ask_spot_placement_scores_and_nothing_new_besides(compute, supervisor):
    """GetSpotPlacementScores ranks zones (capacity.py): granted once to each, on the statement of reads."""
    for statements in (compute.role_statements(supervisor.function.role), _user_policy(compute)[1]):
        holding = [s for s in statements if "ec2:GetSpotPlacementScores" in _as_list(s["Action"])]
        assert len(holding) == 1 and holding[0]["Resource"] == "*", holding
        assert all(a.startswith("ec2:Describe") or a.startswith(("pricing:", "servicequotas:", "ec2:GetSpot"))
                   for a in _as_list(holding[0]["Action"])), holding  # fmt: skip


def test_supervisor_role_has_no_wildcard_action_and_star_only_for_describe(compute, supervisor):
    for statement in compute.role_statements(supervisor.function.role):
        actions = _as_list(statement["Action"])
        assert not any(a == "*" or a.endswith(":*") for a in actions), statement
        if statement["Resource"] == "*":
            assert all(
                a.startswith("ec2:Describe")
                or a in ("cloudwatch:GetMetricStatistics", "pricing:GetProducts", "ec2:GetSpotPlacementScores")
                for a in actions
            ), statement


def test_the_monthly_limit_reaches_the_supervisor_and_launch(compute, supervisor):
    env = compute.json["Resources"][compute.logical_id(supervisor.function.function)]["Properties"]["Environment"][
        "Variables"
    ]
    assert env["MONTHLY_LIMIT_USD"] == "200"
    assert compute.json["Outputs"][naming.OUTPUT_MONTHLY_LIMIT_USD]["Value"] == "200"


def test_past_the_monthly_budget_aws_budgets_denies_the_supervisor_new_instances(compute, supervisor):
    deny_id = compute.logical_id(supervisor.deny_launches)
    deny = compute.json["Resources"][deny_id]["Properties"]["PolicyDocument"]["Statement"]
    assert deny == [{"Effect": "Deny", "Action": ["ec2:CreateFleet", "ec2:RunInstances"], "Resource": "*"}]
    _, action = compute.one("AWS::Budgets::BudgetsAction")
    props = action["Properties"]
    assert (props["ActionType"], props["NotificationType"], props["ApprovalModel"]) == (
        "APPLY_IAM_POLICY",
        "ACTUAL",
        "AUTOMATIC",
    )
    assert props["ActionThreshold"] == {"Type": "PERCENTAGE", "Value": 100}
    assert props["Definition"]["IamActionDefinition"] == {
        "PolicyArn": {"Ref": deny_id},
        "Roles": [
            {"Ref": compute.logical_id(supervisor.function.role)},
            {"Ref": compute.logical_id(supervisor.requests.role)},
        ],
    }, "both functions that launch: every launch is denied past the budget"
    assert "Fn::ImportValue" in props["BudgetName"], "the safety stack's monthly budget"
    trusts = [
        r["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]
        for r in compute.resources("AWS::IAM::Role").values()
    ]
    [executor] = [t for t in trusts if t["Principal"] == {"Service": "budgets.amazonaws.com"}]
    assert executor["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}


def test_users_invoke_only_the_request_function_which_no_event_rule_targets(compute, supervisor):
    requests = compute.logical_id(supervisor.requests.function)
    handler = compute.json["Resources"][requests]["Properties"]["Handler"]
    assert handler == "run_requests.handler"
    for rule in compute.resources("AWS::Events::Rule").values():
        assert all(requests not in str(target["Arn"]) for target in rule["Properties"]["Targets"])
    outputs = compute.json["Outputs"]
    assert outputs[naming.OUTPUT_SUPERVISOR_FUNCTION]["Value"] == {"Ref": requests}


def test_training_users_may_open_shell_sessions_with_the_accounts_document_and_end_only_their_own(compute):
    """Session Manager's end-user policy: StartSession names the account's shell document (an ARN without the
    account matches nothing once AWS checks it), and the plugin ends a session with TerminateSession."""
    _, statements = _user_policy(compute)
    by_sid = {s.get("Sid"): s for s in statements}
    document = json.dumps(by_sid["ShellDocument"]["Resource"])
    assert '"AWS::AccountId"' in document and "document/SSM-SessionManagerRunShell" in document
    ending = by_sid["EndOwnSessions"]
    assert sorted(_as_list(ending["Action"])) == ["ssm:ResumeSession", "ssm:TerminateSession"]
    assert "session/${aws:userid}-*" in json.dumps(ending["Resource"])


def test_supervisor_launches_into_a_capacity_reservation_only_from_its_own_templates_and_both_may_describe_blocks(
    compute, supervisor
):
    """A run in a Capacity Block (blocks.py): RunInstances on capacity-reservation/* only where the reservation is
    the launch template's (a run template the supervisor made after checking the block); nothing else on it."""
    statements = compute.role_statements(supervisor.function.role)
    on_blocks = [s for s in statements if "capacity-reservation/" in json.dumps(s["Resource"])]
    assert len(on_blocks) == 1, on_blocks
    (block,) = on_blocks
    assert _as_list(block["Action"]) == ["ec2:RunInstances"]
    assert block["Condition"] == {
        "Bool": {"ec2:IsLaunchTemplateResource": "true"},
        "StringEquals": {"aws:ResourceTag/training-infra:managed": "true"},
    }, "only a block `capacity buy` tagged: no other block of the account"
    for policy_statements in (statements, _user_policy(compute)[1]):
        describing = [s for s in policy_statements if "ec2:DescribeCapacityReservations" in _as_list(s["Action"])]
        assert len(describing) == 1 and describing[0]["Resource"] == "*", describing
    user_actions = {a for s in _user_policy(compute)[1] for a in _as_list(s["Action"])}
    assert not {"ec2:RunInstances", "ec2:CreateFleet", "ec2:PurchaseCapacityBlock"} & user_actions
