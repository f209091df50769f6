"""Multi-node runs from the command line (issue 25): `launch --nodes`, `status RUN` node by node, `logs --node K`,
on the local AWS (moto, the supervisor's real code in process; no placement groups there)."""

from __future__ import annotations

import contextlib
import time

from training_infra import naming


def _put_lines(stacks, stream: str, lines: list[str]) -> None:
    logs = stacks.client("logs")
    group = stacks.outputs[naming.OUTPUT_LOG_GROUP_NAME]
    with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
    now_ms = int(time.time() * 1000)
    logs.put_log_events(
        logGroupName=group, logStreamName=stream,
        logEvents=[{"timestamp": now_ms + i, "message": m} for i, m in enumerate(lines)],
    )  # fmt: skip


def test_launch_nodes_starts_a_gang_and_status_shows_each_nodes_rank_type_zone_address_and_state(stacks):
    result = stacks.cli("launch", "--run-id", "gang-cli", "--nodes", "3")
    assert result.exit_code == 0, result.output
    assert "3 nodes on" in result.stdout

    status = stacks.cli("status", "gang-cli")
    assert status.exit_code == 0, status.output
    assert "nodes of attempt 1" in status.stdout
    instances = stacks.client("ec2").describe_instances(
        Filters=[{"Name": f"tag:{naming.TAG_RUN_ID}", "Values": ["gang-cli"]}]
    )["Reservations"]
    members = sorted((i for r in instances for i in r["Instances"]), key=lambda i: i["InstanceId"])
    assert len(members) == 3
    lines = status.stdout.splitlines()
    for rank, instance in enumerate(members):
        (line,) = [line for line in lines if instance["InstanceId"] in line and instance["PrivateIpAddress"] in line]
        assert line.replace("│", " ").split()[0] == str(rank)
        assert instance["Placement"]["AvailabilityZone"] in line and instance["InstanceType"] in line
        tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
        assert tags[naming.TAG_NODE] == str(rank)
        assert tags[naming.TAG_RENDEZVOUS] == f"{members[0]['PrivateIpAddress']}:29400"


def test_launch_nodes_out_of_range_is_one_usage_line_before_any_aws_call(stacks):
    result = stacks.cli("launch", "--run-id", "gang-bad", "--nodes", "0")
    assert result.exit_code == 2
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert "option '--nodes'" in line and "'0'" in line and "allowed" in line


def test_logs_node_reads_that_nodes_stream(stacks):
    stacks.put_status({"run_id": "gang-logs", "outcome": "succeeded"})
    _put_lines(stacks, "gang-logs", ["node 0 says hello"])
    _put_lines(stacks, "gang-logs/node-2", ["node 2 says hello", "node 2 step 10"])

    result = stacks.cli("logs", "gang-logs", "--node", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["node 2 says hello", "node 2 step 10"]
    assert stacks.cli("logs", "gang-logs", "--node", "0").stdout.splitlines() == ["node 0 says hello"]


def test_logs_node_that_is_not_a_node_index_is_a_usage_error(stacks):
    result = stacks.cli("logs", "gang-logs", "--node", "two")
    assert result.exit_code == 2 and "option '--node': got 'two'" in result.output


def test_local_interrupt_node_that_is_not_a_node_index_is_the_same_usage_line_before_the_sandbox(stacks, tmp_path):
    result = stacks.cli("local", "interrupt", "gang-logs", "--node", "-1", "--dir", str(tmp_path / "no-sandbox"))
    assert result.exit_code == 2
    assert result.stderr == "error: option '--node': got '-1'; allowed: a node index from 0 to the run's nodes - 1\n"


def test_a_gangs_boxes_get_the_stacks_replace_timeout_and_the_nccl_check_switch_in_their_user_data(stacks):
    """Through the real path: the flag, the supervisor's run template, each member's user data, the agent's parser."""
    import base64

    from training_infra.cli.launching import template_exports
    from training_infra.compute.agent.ti_agent import settings
    from training_infra.supervisor.runtime.supervisor import SupervisorConfig

    result = stacks.cli("launch", "--run-id", "gang-nccl", "--nodes", "2", "--no-nccl-efa-check")
    assert result.exit_code == 0, result.output
    ec2 = stacks.client("ec2")
    members = stacks.run_instances("gang-nccl")
    assert len(members) == 2
    replace = SupervisorConfig(table="", outputs_bucket="").gang_replace_seconds
    for instance in members:
        data = ec2.describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")
        exports = template_exports(base64.b64decode(data["UserData"]["Value"]).decode())
        assert exports["TI_GANG_REPLACE_SECONDS"] == str(replace) and exports["TI_NCCL_EFA_CHECK"] == "false"
        knobs = settings.parse({**exports, "TI_IMAGE_URI": exports.get("TI_IMAGE_URI") or "i"}).knobs
        assert knobs.gang_replace_seconds == replace and knobs.nccl_efa_check is False


def test_a_gang_command_that_cannot_be_wrapped_is_refused_before_anything_starts(stacks):
    result = stacks.cli("launch", "--run-id", "gang-cmd", "--nodes", "2", "--command", "python train.py | tee log")
    assert result.exit_code == 2
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert line.endswith("(here: '|' outside quotes makes it more than one program)")
    assert not stacks.run_instances("gang-cmd")
