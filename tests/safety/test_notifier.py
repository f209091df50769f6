"""The state-change notifier against moto's EC2, SNS and SQS (`mock_aws`, in process; see conftest.py)."""

from __future__ import annotations

from training_infra import naming
from training_infra.safety.runtime import notifier

REGION = "us-east-1"


def state_change(instance_id: str, state: str) -> dict:
    """The shape EventBridge delivers for an EC2 Instance State-change Notification."""
    return {
        "version": "0",
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "region": REGION,
        "resources": [f"arn:aws:ec2:{REGION}:123456789012:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "state": state},
    }


def test_defaults_match_the_names_the_construct_and_cli_use():
    assert notifier.DEFAULT_MANAGED_TAG == naming.TAG_MANAGED
    assert notifier.DEFAULT_RUN_ID_TAG == naming.TAG_RUN_ID


def test_managed_instance_state_change_becomes_a_readable_notice(aws):
    instance_id = aws.launch({naming.TAG_MANAGED: "true", naming.TAG_RUN_ID: "bert-lr3e4"})

    result = notifier.handler(state_change(instance_id, "stopped"), None)

    assert result["notified"] is True
    [notice] = aws.notices()
    assert notice["Subject"] == f"training-infra: run bert-lr3e4 instance {instance_id} stopped"
    assert notice["Message"].startswith(f"Run bert-lr3e4: instance {instance_id} (g5.xlarge, on-demand) has stopped")


def test_unmanaged_instance_state_change_stays_silent(aws):
    other = aws.launch({"team": "search"})
    not_true = aws.launch({naming.TAG_MANAGED: "false"})

    for instance_id in (other, not_true):
        assert notifier.handler(state_change(instance_id, "running"), None)["notified"] is False
    assert aws.notices() == []


def test_instance_unknown_to_ec2_is_ignored_without_failing(aws):
    result = notifier.handler(state_change("i-0123456789abcdef0", "terminated"), None)

    assert result["notified"] is False
    assert aws.notices() == []


def test_event_without_instance_details_is_ignored(aws):
    assert notifier.handler({"detail-type": "Scheduled Event", "detail": {}}, None)["notified"] is False
    assert aws.notices() == []
