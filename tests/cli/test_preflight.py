"""The launch preflight: every failure with its exact line, nothing created, and `--dry-run`.

Against the local AWS wherever it answers (ECR, S3, the run table, DescribeInstanceTypeOfferings,
DescribeInstanceTypes, a dry-run RunInstances, spot price history). It has no Service Quotas for
EC2 and no Price List API: the launch says so once, and the real answers are covered with a botocore
Stubber fed the documented response shapes (GetServiceQuota, an UnauthorizedOperation dry run).
"""

from __future__ import annotations

import re

import botocore.session
import pytest
from botocore.stub import Stubber

from training_infra import naming
from training_infra.cli import preflight
from training_infra.cli.launching import LOCAL_NOTE, supervisor_with
from training_infra.supervisor.runtime.records import RunState, RunStore

EMPTY_DATA_REGION = "sa-east-1"  # this module's own: no other module deploys there (ap-southeast-2 must stay empty)
NOTES = [
    "note: vCPU quota: skipped: not available here (NoSuchResourceException)",
    "note: spot placement scores: skipped: not available here (ResponseParserError)",
    "note: list price from the built-in table (the Price List API did not answer: HTTP 500)",
]


def _record(stacks, run_id: str):
    return RunStore(stacks.client("dynamodb"), stacks.outputs[naming.OUTPUT_RUN_TABLE]).get(run_id)


def _nothing_created(stacks, run_id: str) -> None:
    """No record, no run template, no instance: the preflight left no trace."""
    assert _record(stacks, run_id) is None
    templates = stacks.client("ec2").describe_launch_templates(
        Filters=[{"Name": "launch-template-name", "Values": [f"training-infra-run-{run_id}"]}]
    )["LaunchTemplates"]
    assert templates == [] and stacks.run_instances(run_id) == []


def _refused(stacks, *args: str, env=None) -> str:
    result = stacks.cli("launch", *args, env=env)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    return result.stderr


def _finish(stacks, run_id: str, state: str = "succeeded") -> None:
    """End a run as the supervisor does: final state and its run template deleted."""
    supervisor = supervisor_with(
        stacks.client, table=stacks.outputs[naming.OUTPUT_RUN_TABLE], outputs_bucket=stacks.outputs_bucket
    )
    run = supervisor.store.get(run_id)
    run.state, run.ended_at = RunState(state), "2026-11-29T08:00:00Z"
    run.attempts[-1].ended_at = run.attempts[-1].ended_at or "2026-11-29T08:00:00Z"
    supervisor.store.save(run)
    stacks.client("ec2").delete_launch_template(LaunchTemplateId=run.spec.launch_template_id)


# --- --dry-run ---------------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_with_prices_and_creates_nothing(stacks):
    result = stacks.cli("launch", "--run-id", "pf-dry", "--dry-run", "--max-price", "0.9", "--max-runtime-hours", "3")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    repository = stacks.outputs[naming.OUTPUT_ECR_REPOSITORY_URI]
    assert lines[0] == "preflight passed for run pf-dry; --dry-run: nothing created"
    assert "  run        pf-dry (new)" in lines
    assert f"  image      {repository}:latest (in ECR)" in lines
    assert f"  data       s3://{stacks.data_bucket}/data/ (has objects)" in lines
    assert "  pools      4 of 4 type x zone pairs offered by EC2" in lines
    assert "  price cap  $0.90/hour: 4 spot pool(s) fit" in lines
    assert "  caps       fleet MaxTotalPrice 0.9, spot MaxPrice per pool" in lines
    assert any(line.startswith("  deadline   20") and "(one deadline for every attempt)" in line for line in lines)
    assert f"  g5.xlarge      {stacks.region}a       spot $0.00001" in lines, "moto's spot price history, read"
    assert lines[-3:] == NOTES, "each check that could not run here says so once"
    _nothing_created(stacks, "pf-dry")


def test_dry_run_shows_each_zones_spot_placement_score_for_the_runs_types_and_size(stacks, ec2_faults):
    """GetSpotPlacementScores played by the loopback proxy in its documented XML shape (moto has none)."""
    ids = {z["ZoneName"]: z["ZoneId"] for z in stacks.client("ec2").describe_availability_zones()["AvailabilityZones"]}
    ec2_faults.placement_scores = {ids[f"{stacks.region}a"]: 9, ids[f"{stacks.region}b"]: 2}
    result = stacks.cli("launch", "--run-id", "pf-scores", "--dry-run", env={"AWS_ENDPOINT_URL_EC2": ec2_faults.url})

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    [scores] = [line for line in lines if line.startswith("  spot scores")]
    assert scores.split(None, 2)[2].startswith(
        f"{stacks.region}a 9, {stacks.region}b 2 (g5.xlarge, g6.xlarge; 1 instance(s); 1-10, 10: very likely"
    ), scores
    assert f"  g5.xlarge      {stacks.region}a       spot $0.00001, zone score 9/10" in lines
    assert f"  g6.xlarge      {stacks.region}b       spot $0.00001, zone score 2/10" in lines
    assert any(line.startswith("note: spot placement scores: scored for 2 type(s)") for line in lines)
    [call] = ec2_faults.score_calls
    assert "SingleAvailabilityZone=true" in call and "TargetCapacity=1" in call and "RegionName.1=us-east-1" in call
    _nothing_created(stacks, "pf-scores")


def test_dry_run_of_spot_then_on_demand_shows_both_prices_and_which_are_over_the_cap(stacks):
    result = stacks.cli(
        "launch", "--run-id", "pf-dry-both", "--dry-run", "--market", "spot-then-on-demand", "--max-price", "0.9"
    )

    assert result.exit_code == 0, result.output
    assert f"  g5.xlarge      {stacks.region}b       spot $0.00001, on-demand $1.006 (over the cap: not offered)" in (
        result.stdout.splitlines()
    )
    assert f"  g6.xlarge      {stacks.region}b       spot $0.00001, on-demand $0.805" in result.stdout.splitlines()


def test_a_launch_that_passes_says_once_what_it_could_not_check_on_stderr(stacks):
    result = stacks.cli("launch", "--run-id", "pf-notes", "--quiet")

    assert result.exit_code == 0, result.output
    assert result.stdout == "pf-notes\n", "stdout stays the run id alone"
    assert result.stderr.splitlines() == [*NOTES, f"note: {LOCAL_NOTE}"], "and the local AWS says who played Lambda"


# --- image, data ------------------------------------------------------------------------------------------


def test_an_image_tag_not_in_ecr_is_refused_before_anything_is_created(stacks):
    assert _refused(stacks, "--run-id", "pf-no-image", "--image-tag", "never-pushed") == (
        "error: image training-infra:never-pushed is not in ECR: push it first (the image workflow pushes every "
        "commit to main as its SHA and latest) or pass --image-tag with a pushed tag "
        "(`aws ecr list-images --repository-name training-infra`)\n"
    )
    _nothing_created(stacks, "pf-no-image")


def test_a_missing_ecr_repository_says_to_deploy():
    ecr = _client("ecr")
    report = _report()
    with Stubber(ecr) as stub:
        stub.add_client_error(
            "describe_images",
            "RepositoryNotFoundException",
            "The repository with name 'training-infra' does not exist in the registry with id '123456789012'",
            expected_params={
                "registryId": "123456789012", "repositoryName": "training-infra", "imageIds": [{"imageTag": "latest"}]
            },
        )  # fmt: skip
        preflight.check_image(report, ecr, "123456789012.dkr.ecr.us-east-1.amazonaws.com/training-infra")

    assert report.failures == ["ECR repository training-infra does not exist: deploy the stacks (`make deploy`)"]


def test_an_empty_data_prefix_is_refused_unless_allowed(deployed):
    empty = deployed(EMPTY_DATA_REGION, empty_data=True)

    assert _refused(empty, "--run-id", "pf-no-data") == (
        f"error: no training data: s3://{empty.data_bucket}/data/ is empty: upload it first "
        "(`training-infra upload ./data`) or pass --allow-empty-data\n"
    )
    _nothing_created(empty, "pf-no-data")
    allowed = empty.cli("launch", "--run-id", "pf-no-data", "--allow-empty-data", "--dry-run")
    assert allowed.exit_code == 0, allowed.output
    assert f"  data      s3://{empty.data_bucket}/data/ (empty; --allow-empty-data)" in allowed.stdout.splitlines()


def test_every_failure_is_reported_at_once_one_line_each(deployed):
    empty = deployed(EMPTY_DATA_REGION, empty_data=True)

    lines = _refused(empty, "--run-id", "pf-two-problems", "--image-tag", "nope").splitlines()

    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert lines[0].startswith("error: image training-infra:nope is not in ECR")
    assert lines[1].startswith("error: no training data: ")


# --- where the run may go ---------------------------------------------------------------------------------


def test_types_ec2_does_not_offer_in_the_runs_zones_are_refused(deployed):
    stacks = deployed("eu-north-1", published_zones="b")
    zone_a = next(
        s["SubnetId"]
        for s in stacks.client("ec2").describe_subnets(
            Filters=[{"Name": "availability-zone", "Values": ["eu-north-1a"]}]
        )["Subnets"]
        if s["CidrBlock"].startswith("10.20.")
    )

    stderr = _refused(stacks, "--run-id", "pf-not-offered", "--instance-types", "g5.xlarge", "--subnet-id", zone_a)

    assert stderr == (
        "error: no instance type offered where the run may go: EC2 offers none of g5.xlarge in eu-north-1a "
        "(DescribeInstanceTypeOfferings): pass --instance-types with a type offered there "
        "(`aws ec2 describe-instance-type-offerings --location-type availability-zone --region eu-north-1`)\n"
    )
    _nothing_created(stacks, "pf-not-offered")


# --- run ids ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run_id", "why"),
    [
        ("latest", "runs/latest/ holds a copy of the newest finished run (`fetch latest`)"),
        ("default", "the run id of the create_instance instance when the run_id setting is empty"),
    ],
)
def test_reserved_run_ids_are_refused_before_calling_aws(stacks, run_id, why):
    assert stacks.usage_error("launch", "--run-id", run_id) == (
        f"error: option '--run-id': got {run_id!r}; allowed: any run id but default, latest ({run_id}: {why})\n"
    )


def test_resume_needs_a_run_id(stacks):
    assert stacks.usage_error("launch", "--resume") == (
        "error: option '--resume': needs --run-id, the finished run to continue\n"
    )


def test_reusing_a_finished_runs_id_needs_resume(stacks):
    assert stacks.cli("launch", "--run-id", "pf-finished").exit_code == 0
    _finish(stacks, "pf-finished")

    assert _refused(stacks, "--run-id", "pf-finished") == (
        "error: run pf-finished ended succeeded: pass --resume to continue it from its checkpoints, "
        "or choose another --run-id\n"
    )
    assert len(stacks.run_instances("pf-finished")) == 1


def test_resume_continues_a_finished_run_with_its_next_attempt_under_the_same_id(stacks):
    assert stacks.cli("launch", "--run-id", "pf-resume", "--max-runtime-hours", "2").exit_code == 0
    before = _record(stacks, "pf-resume")
    _finish(stacks, "pf-resume", state="stopped")

    result = stacks.cli("launch", "--run-id", "pf-resume", "--resume", "--max-runtime-hours", "5")

    assert result.exit_code == 0, result.output
    assert "launched run pf-resume: attempt 2 on " in result.stdout
    run = _record(stacks, "pf-resume")
    assert run.active and run.created_at == before.created_at, "the same record goes on"
    assert [a.n for a in run.attempts] == [1, 2], "attempt 1 kept: nothing under attempts/1/ is overwritten"
    assert run.deadline_at > before.deadline_at and run.spec.max_runtime_hours == 5
    tags = [{t["Key"]: t["Value"] for t in i["Tags"]} for i in stacks.run_instances("pf-resume")]
    assert sorted(t[naming.TAG_ATTEMPT] for t in tags) == ["1", "2"]


def test_a_run_id_used_before_the_run_table_needs_resume(stacks):
    stacks.put_status({"run_id": "pf-legacy", "outcome": "succeeded"})

    assert _refused(stacks, "--run-id", "pf-legacy") == (
        f"error: run pf-legacy has outputs in s3://{stacks.outputs_bucket}/runs/pf-legacy/: pass --resume to "
        "continue it from its checkpoints, or choose another --run-id\n"
    )
    resumed = stacks.cli("launch", "--run-id", "pf-legacy", "--resume", "--dry-run")
    assert resumed.exit_code == 0, resumed.output
    assert (
        f"  run       pf-legacy (resumed: attempt 1, from s3://{stacks.outputs_bucket}/checkpoints/pf-legacy/)"
        in resumed.stdout.splitlines()
    )


def test_resume_of_an_unknown_run_is_refused(stacks):
    assert _refused(stacks, "--run-id", "pf-never-was", "--resume") == (
        "error: --resume: there is no run pf-never-was to continue (`training-infra status` lists runs); "
        "leave out --resume for a new run\n"
    )
    _nothing_created(stacks, "pf-never-was")


def test_resume_of_an_active_run_is_refused(stacks):
    assert stacks.cli("launch", "--run-id", "pf-still-on").exit_code == 0

    assert _refused(stacks, "--run-id", "pf-still-on", "--resume") == (
        "error: run pf-still-on is still launching: nothing to resume (`training-infra stop pf-still-on` ends it)\n"
    )


# --- price caps -------------------------------------------------------------------------------------------


def test_a_cap_below_every_known_price_is_refused_naming_the_cheapest_and_the_cap(stacks):
    stderr = _refused(stacks, "--run-id", "pf-too-cheap", "--market", "on-demand", "--max-price", "0.5")

    assert stderr == (
        f"error: no pool at or under the price cap of $0.50/hour: the cheapest seen is $0.805/hour "
        f"(g6.xlarge, on-demand, {stacks.region}a): raise --max-price or choose cheaper --instance-types or --market\n"
    )
    _nothing_created(stacks, "pf-too-cheap")


def test_the_cap_is_stored_in_the_spec_and_set_on_the_fleet(stacks, ec2_faults):
    result = stacks.cli(
        "launch", "--run-id", "pf-capped", "--max-price", "0.6", env={"AWS_ENDPOINT_URL_EC2": ec2_faults.url}
    )

    assert result.exit_code == 0, result.output
    assert _record(stacks, "pf-capped").spec.max_price_usd == 0.6
    [request] = ec2_faults.fleet_calls
    assert "SpotOptions.MaxTotalPrice=0.6" in request
    assert len(re.findall(r"Overrides\.\d+\.MaxPrice=0\.6&", request)) == 4, "each of the 4 pools"


@pytest.mark.parametrize("value", ["-1", "0", "0.000001", "abc", "nan", "inf", "1001", ""])
def test_a_bad_max_price_is_one_usage_line_before_calling_aws(stacks, value):
    """Issue 27: 0.000001 was echoed as `$0.00/hour`; below a tenth of a cent is no EC2 price."""
    assert stacks.usage_error("launch", "--max-price", value) == (
        f"error: option '--max-price': got {value!r}; allowed: USD per hour from 0.001 up to 1000, e.g. 0.60\n"
    )


# --- quotas: the real answers, from a Stubber ---------------------------------------------


def _client(service: str):
    return botocore.session.get_session().create_client(
        service,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106
    )


def _report(types=("g5.xlarge", "g6.xlarge"), market="spot") -> preflight.Report:
    plan = preflight.Plan(
        run_id="r", image_tag="latest", instance_types=list(types), market=market, subnets=["subnet-a"],
        deadline="2026-11-29T20:00:00Z", template_id="lt-0123456789abcdef0",
        run_tags={naming.TAG_MANAGED: "true", naming.TAG_RUN_ID: "r"},
    )  # fmt: skip
    report = preflight.Report(plan)
    report.zones = {"subnet-a": "us-east-1a"}
    report.offered = [(t, "us-east-1a") for t in types]
    return report


def _instance_types(stub: Stubber, vcpus: dict[str, int]) -> None:
    stub.add_response(
        "describe_instance_types",
        {"InstanceTypes": [{"InstanceType": t, "VCpuInfo": {"DefaultVCpus": n}} for t, n in vcpus.items()]},
        {"InstanceTypes": sorted(vcpus)},
    )


def _running(stub: Stubber, instances=(), more_types: dict[str, int] | None = None) -> None:
    """DescribeInstances of the account's running and pending instances: (type, lifecycle) pairs, in its shape."""
    stub.add_response(
        "describe_instances",
        {"Reservations": [{"ReservationId": f"r-{n:017x}", "Instances": [
            {"InstanceId": f"i-{n:017x}", "InstanceType": t, "State": {"Code": 16, "Name": "running"},
             **({"InstanceLifecycle": "spot"} if life == "spot" else {})}]} for n, (t, life) in enumerate(instances)]},
        {"Filters": [{"Name": "instance-state-name", "Values": ["pending", "running"]}]},
    )  # fmt: skip
    if more_types:
        _instance_types(stub, more_types)


def _quota(stub: Stubber, code: str, name: str, value: float) -> None:
    stub.add_response(
        "get_service_quota",
        {"Quota": {"ServiceCode": "ec2", "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)",
                   "QuotaArn": f"arn:aws:servicequotas:us-east-1:123456789012:ec2/{code}", "QuotaCode": code,
                   "QuotaName": name, "Value": value, "Unit": "None", "Adjustable": True, "GlobalQuota": False}},
        {"ServiceCode": "ec2", "QuotaCode": code},
    )  # fmt: skip


def test_a_vcpu_quota_below_what_the_run_needs_names_the_quota_code_and_the_increase_command():
    ec2, quotas = _client("ec2"), _client("service-quotas")
    report = _report()
    with Stubber(ec2) as ec2_stub, Stubber(quotas) as quota_stub:
        _instance_types(ec2_stub, {"g5.xlarge": 4, "g6.xlarge": 4})
        _running(ec2_stub)
        _quota(quota_stub, "L-3819A6DF", "All G and VT Spot Instance Requests", 0.0)
        preflight.check_quotas(report, ec2, quotas, "us-east-1")

    assert report.failures == [
        "vCPU quota too low for spot: g5.xlarge needs 4 vCPUs and 'All G and VT Spot Instance Requests' "
        "(L-3819A6DF) is 0 in us-east-1: ask for more with `aws service-quotas request-service-quota-increase "
        "--service-code ec2 --quota-code L-3819A6DF --desired-value 4 --region us-east-1`"
    ]


def test_one_type_within_its_quota_is_enough(stacks):
    ec2, quotas = _client("ec2"), _client("service-quotas")
    report = _report(types=("g5.xlarge", "p3.2xlarge"), market="on-demand")
    with Stubber(ec2) as ec2_stub, Stubber(quotas) as quota_stub:
        _instance_types(ec2_stub, {"g5.xlarge": 4, "p3.2xlarge": 8})
        _running(ec2_stub)
        _quota(quota_stub, "L-DB2E81BA", "Running On-Demand G and VT instances", 0.0)
        _quota(quota_stub, "L-417A185B", "Running On-Demand P instances", 8.0)
        preflight.check_quotas(report, ec2, quotas, "us-east-1")

    assert report.failures == []
    assert report.lines == [("quota", "Running On-Demand P instances (L-417A185B) 8 >= 8 for p3.2xlarge")]


def test_spot_then_on_demand_is_refused_only_when_neither_market_has_quota_one_line_each():
    ec2, quotas = _client("ec2"), _client("service-quotas")
    report = _report(types=("g6.xlarge",), market="spot-then-on-demand")
    with Stubber(ec2) as ec2_stub, Stubber(quotas) as quota_stub:
        _instance_types(ec2_stub, {"g6.xlarge": 4})
        _running(ec2_stub)
        _quota(quota_stub, "L-3819A6DF", "All G and VT Spot Instance Requests", 0.0)
        _quota(quota_stub, "L-DB2E81BA", "Running On-Demand G and VT instances", 2.0)
        preflight.check_quotas(report, ec2, quotas, "us-east-1")

    assert [line.split(":")[0] for line in report.failures] == [
        "vCPU quota too low for spot",
        "vCPU quota too low for on-demand",
    ]
    assert "--quota-code L-DB2E81BA --desired-value 4" in report.failures[1]


def test_vcpus_of_running_instances_count_against_the_quota_of_their_family_and_market():
    """A 16-vCPU spot quota with a g5.2xlarge (8) spot and a g5.4xlarge (16) on demand running: the spot one
    leaves 8, too few for a g5.4xlarge; the on-demand one counts against the other quota, not this one."""
    ec2, quotas = _client("ec2"), _client("service-quotas")
    report = _report(types=("g5.4xlarge",))
    with Stubber(ec2) as ec2_stub, Stubber(quotas) as quota_stub:
        _instance_types(ec2_stub, {"g5.4xlarge": 16})
        _running(ec2_stub, [("g5.2xlarge", "spot"), ("g5.4xlarge", "on-demand"), ("c7i.large", "spot")],
                 more_types={"c7i.large": 2, "g5.2xlarge": 8})  # fmt: skip
        _quota(quota_stub, "L-3819A6DF", "All G and VT Spot Instance Requests", 16.0)
        preflight.check_quotas(report, ec2, quotas, "us-east-1")

    assert report.failures == [
        "vCPU quota too low for spot: g5.4xlarge needs 16 vCPUs and 'All G and VT Spot Instance Requests' "
        "(L-3819A6DF) is 16 in us-east-1, and running instances already use 8 of it: ask for more with "
        "`aws service-quotas request-service-quota-increase --service-code ec2 --quota-code L-3819A6DF "
        "--desired-value 24 --region us-east-1`"
    ]


def test_a_p5_spot_run_is_checked_against_the_p5_spot_quota_less_what_runs():
    ec2, quotas = _client("ec2"), _client("service-quotas")
    report = _report(types=("p5.48xlarge",))
    with Stubber(ec2) as ec2_stub, Stubber(quotas) as quota_stub:
        _instance_types(ec2_stub, {"p5.48xlarge": 192})
        _running(ec2_stub, [("p4d.24xlarge", "spot")], more_types={"p4d.24xlarge": 96})
        _quota(quota_stub, "L-C4BD4855", "All P5 Spot Instance Requests", 192.0)
        preflight.check_quotas(report, ec2, quotas, "us-east-1")

    assert report.failures == [], "a running p4d counts against the P4, P3 and P2 quota, not the P5 one"
    assert report.lines == [("quota", "All P5 Spot Instance Requests (L-C4BD4855) 192 >= 192 for p5.48xlarge")]


def test_a_trn_spot_run_counts_the_running_trn_spot_vcpus():
    ec2, quotas = _client("ec2"), _client("service-quotas")
    report = _report(types=("trn1.2xlarge",))
    with Stubber(ec2) as ec2_stub, Stubber(quotas) as quota_stub:
        _instance_types(ec2_stub, {"trn1.2xlarge": 8})
        _running(ec2_stub, [("trn1.2xlarge", "spot")])
        _quota(quota_stub, "L-6B0D517C", "All Trn Spot Instance Requests", 16.0)
        preflight.check_quotas(report, ec2, quotas, "us-east-1")

    assert report.lines == [
        ("quota", "All Trn Spot Instance Requests (L-6B0D517C) 16 - 8 in use >= 8 for trn1.2xlarge")
    ]


@pytest.mark.parametrize(
    ("instance_type", "market", "code"),
    [
        ("g6e.xlarge", "spot", "L-3819A6DF"),
        ("gr6.4xlarge", "on-demand", "L-DB2E81BA"),
        ("p4d.24xlarge", "spot", "L-7212CCBC"),
        ("p5.48xlarge", "on-demand", "L-417A185B"),
        ("p5.48xlarge", "spot", "L-C4BD4855"),
        ("p5en.48xlarge", "spot", "L-C4BD4855"),
        ("trn1.32xlarge", "spot", "L-6B0D517C"),
        ("trn2.48xlarge", "on-demand", "L-2C3B7624"),
        ("inf2.xlarge", "spot", "L-B5D1601B"),
        ("trn1.2xlarge", "on-demand", "L-2C3B7624"),
        ("c7i.large", "spot", "L-34B43A08"),
        ("t3.micro", "on-demand", "L-1216C47A"),
    ],
)
def test_each_type_is_checked_against_its_familys_quota_for_the_market(instance_type, market, code):
    found = preflight.QUOTAS.get((preflight.family_group(instance_type) or "", market))
    assert (found[0] if found else None) == code


def test_a_gangs_vcpu_quota_must_hold_every_node_at_once():
    ec2, quotas = _client("ec2"), _client("service-quotas")
    report = _report(types=("g5.12xlarge",))
    report.plan.nodes = 4
    with Stubber(ec2) as ec2_stub, Stubber(quotas) as quota_stub:
        _instance_types(ec2_stub, {"g5.12xlarge": 48})
        _quota(quota_stub, "L-3819A6DF", "All G and VT Spot Instance Requests", 96.0)  # two nodes' worth
        preflight.check_quotas(report, ec2, quotas, "us-east-1")

    (failure,) = report.failures
    assert failure.startswith("vCPU quota too low for spot: g5.12xlarge x 4 nodes needs 192 vCPUs")
    assert "--desired-value 192" in failure
