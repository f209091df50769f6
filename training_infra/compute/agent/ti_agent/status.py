"""The attempt's outcome and its record, runs/<id>/attempts/<n>/status.json (docs/agent.md)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    IDLE = "idle"
    DEADLINE = "deadline"
    STOPPED = "stopped"
    BUDGET = "budget"
    STALLED = "stalled"


@dataclass(frozen=True)
class StopReason:
    """Why a watcher (or a signal) ended the trainer: the first one wins."""

    outcome: Outcome
    message: str
    grace: int


@dataclass(frozen=True)
class Instance:
    instance_id: str = "unknown"
    instance_type: str = "unknown"
    availability_zone: str = "unknown"
    market: str = "spot"
    region: str = ""


def build_status(
    *,
    run_id: str,
    attempt: int,
    outcome: Outcome,
    exit_code: int | None,
    started_at: str,
    ended_at: str,
    duration_seconds: int,
    instance: Instance,
    hourly_price_usd: float,
    image: str,
    message: str,
    progress: dict | None,
    cold_start: dict | None = None,
) -> dict:
    """status.json: the attempt's record (the supervisor's) and the run's summary (the CLI's)."""
    return {
        "run_id": run_id,
        "attempt": attempt,
        "outcome": outcome.value,
        "exit_code": exit_code,
        "started_at": started_at,
        "ended_at": ended_at,
        "duration_seconds": duration_seconds,
        "instance_id": instance.instance_id,
        "instance_type": instance.instance_type,
        "market": instance.market,
        "availability_zone": instance.availability_zone,
        "hourly_price_usd": hourly_price_usd,
        # On-demand list price: an upper bound for spot, which usually costs far less.
        "estimated_cost_usd": round(hourly_price_usd * duration_seconds / 3600, 4),
        "image": image,
        "message": message,
        # The trainer's last progress (HEARTBEAT_FILE): {step, steps_per_second, changed_at}; null: never reported.
        "progress": progress,
        # Image, data and checkpoints at once (issue 29): {total_seconds, parts: {image, data, checkpoints},
        # slowest, failed}; null: the attempt ended before them.
        "cold_start": cold_start,
    }
