"""The EventBridge events AWS sends about EC2 instances, built here because the local AWS sends none.

Shapes as the EventBridge user guide documents them ("Amazon EC2 events"): the common envelope
(`version`, `id`, `detail-type`, `source`, `account`, `time`, `region`, `resources`) around a
`detail` of `instance-id` plus `state` (state change) or `instance-action` (spot warning). The
demo and the tests hand them to the supervisor's real handler, in-process, as EventBridge would.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

STATE_CHANGE = "EC2 Instance State-change Notification"
SPOT_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
SCHEDULED = "Scheduled Event"


def ec2_event(detail_type: str, instance_id: str = "", *, region: str = "us-east-1", account: str = "123456789012",
              time: datetime | None = None, **detail: Any) -> dict[str, Any]:  # fmt: skip
    """`ec2_event(STATE_CHANGE, "i-0abc", state="terminated")`; `ec2_event(SCHEDULED)` for the one-minute rule."""
    when = (time or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    scheduled = detail_type == SCHEDULED
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": "aws.events" if scheduled else "aws.ec2",
        "account": account,
        "time": when,
        "region": region,
        "resources": (
            [f"arn:aws:events:{region}:{account}:rule/reconcile"]
            if scheduled
            else [f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"]
        ),
        "detail": {} if scheduled else {"instance-id": instance_id, **detail},
    }
