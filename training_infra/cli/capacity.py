"""Why a managed run waits (`status RUN -v`): each pool tried, EC2's last answer for it, cooldowns, the next try.

Read from the run record only (records.py): the supervisor keeps the per-pool errors of the last failed
try on the attempt (`Attempt.errors`, with `tries` counting a streak of them), the pools cooling down
after a reclaim on the run (`Run.cooldown`), and it tries again at each one-minute reconcile.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from training_infra.supervisor.runtime.capacity import LEFT_OUT
from training_infra.supervisor.runtime.records import AttemptEnd, Run, RunState, iso, parse_iso

RECONCILE_SECONDS = 60  # the supervisor's schedule (supervisor/construct.py)
# EC2's error codes in words a user acts on.
ANSWERS = {
    "InsufficientInstanceCapacity": "insufficient capacity",
    "InsufficientCapacity": "insufficient capacity",
    "UnfulfillableCapacity": "insufficient capacity",
    "MaxSpotInstanceCountExceeded": "max spot count: the account's spot vCPU quota is used up",
    "SpotMaxPriceTooLow": "price over the cap: the spot price is above --max-price",
    "VcpuLimitExceeded": "vCPU quota used up",
    "InsufficientFreeAddressesInSubnet": "no free IP address in the subnet",
    LEFT_OUT: "not offered: spot placement score too low",
}
THROTTLED = "EC2 throttled or failed the request (it passes by itself)"


def answer_words(code: str) -> str:
    if code in ANSWERS:
        return ANSWERS[code]
    if code in ("RequestLimitExceeded", "Throttling", "ThrottlingException") or code.startswith(("Internal", "Serv")):
        return THROTTLED
    return code or "no answer recorded"


def waiting(run: Run, now: datetime) -> dict[str, Any] | None:
    """Why the run has no instance now, or None when it has one (or has ended)."""
    if not run.active or run.state not in (RunState.LAUNCHING, RunState.RECOVERING):
        return None
    current = run.current
    if current is not None and current.instance_id:
        return None
    last = run.attempts[-1] if run.attempts else None
    pools = []
    if last is not None and last.end_reason == AttemptEnd.CAPACITY:
        for error in last.errors:
            pools.append(
                {
                    "pool": error.get("pool") or f"every pool ({error.get('market', '?')})",
                    "market": error.get("market", ""),
                    "code": error.get("code", ""),
                    "answer": answer_words(error.get("code", "")),
                    "message": error.get("message", ""),
                }
            )
    cooling = {
        pool: until for pool, until in sorted(run.cooldown.items()) if (parse_iso(until) or now) > now
    }  # fmt: skip
    tried_at = parse_iso(last.ended_at) if last is not None and last.end_reason == AttemptEnd.CAPACITY else None
    next_try = max(now, tried_at + timedelta(seconds=RECONCILE_SECONDS)) if tried_at else now
    deadline = parse_iso(run.deadline_at)
    return {
        "why": run.message,
        "tries": last.tries if last is not None and last.end_reason == AttemptEnd.CAPACITY else 0,
        "last_try_at": iso(tried_at) if tried_at else "",
        "pools": pools,
        "cooldown": cooling,
        "next_try_at": iso(next_try),
        "deadline_at": iso(deadline) if deadline else "",
    }


def waiting_lines(found: dict[str, Any] | None) -> list[str]:
    """The `status RUN -v` block: short lines, one per pool and cooldown."""
    if found is None:
        return []
    lines = ["why it waits:"]
    if found["tries"]:
        lines.append(f"  {found['tries']} tr{'y' if found['tries'] == 1 else 'ies'} without an instance; "
                     f"last {found['last_try_at']}")  # fmt: skip
    if found["pools"]:
        lines.append("  EC2's last answer per pool:")
        lines += [f"    {p['pool']} ({p['market']}): {p['answer']} [{p['code']}]" for p in found["pools"]]
    elif found["tries"]:
        lines.append(f"  {found['why']}")
    for pool, until in found["cooldown"].items():
        lines.append(f"  cooldown: {pool} until {until} (reclaimed there; other pools first)")
    lines.append(f"  next try: {found['next_try_at']} (the supervisor tries every minute until the deadline"
                 + (f" {found['deadline_at']})" if found["deadline_at"] else ")"))  # fmt: skip
    return lines
