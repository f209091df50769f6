"""A replacement on the spot interruption notice: the next attempt starts while the old box saves.

Without it, the supervisor relaunched only once the reclaimed instance had ended, so interruption to
training again was notice + boot + restore. With it, on `EC2 Spot Instance Interruption Warning` the
supervisor ends the warned attempt in the record at once (reclaimed, its end the notice's end: EC2 takes
the box two minutes after the warning), cools its pool down, and claims and launches the next attempt
on another pool, tagged `training-infra:replaces=<old attempt>`. The new box boots while the old one
writes its final checkpoint; its agent restores only after the final status.json of every earlier attempt
that may still save is in S3, or at `replaces-until` (the latest notice's end + 30 s): ti_agent/handover.py.
The old agent writes no checkpoint after its notice's action time (checkpoints.Checkpoints.cut_off), so two
trainers never write one checkpoint, and the gap is about max(boot, final save) instead of their sum.

The old attempt is priced up to the notice's end, so the overlap of two boxes (at most one notice per
interruption) is in the run's cost; a box EC2 has not taken, which end_outlivers terminates later, is priced
again up to that terminate. Only for a spot attempt with an instance, no stop requested, and the
warned attempt still the run's current one: handling the same warning twice starts one replacement.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

try:  # the Lambda package is this folder; the CLI imports it as part of training_infra
    from records import AttemptEnd, StaleRecord, iso, parse_iso
except ImportError:  # pragma: no cover - exercised by the CLI and the tests
    from training_infra.supervisor.runtime.records import AttemptEnd, StaleRecord, iso, parse_iso

log = logging.getLogger(__name__)

# EC2 gives a spot instance two minutes between the interruption warning and taking it (EC2 User Guide,
# "Spot Instance interruption notices").
NOTICE = timedelta(minutes=2)
REPLACES_TAG = "training-infra:replaces"
UNTIL_TAG = "training-infra:replaces-until"
SHUTDOWN_MARGIN = timedelta(seconds=30)  # EC2 stopping the box after the notice's end
# How long after its notice's end (+ margin) the reconcile still looks for a warned box EC2 has not taken: it looks
# each minute until then (one DescribeInstances per such attempt), and terminates the box if it still runs.
OUTLIVE_WINDOW = timedelta(minutes=15)


def on_notice(
    supervisor: Any, run_id: str, attempt_number: int, warned_at: str, action: str = "terminate"
) -> dict[str, Any] | None:
    """Start the replacement of a warned attempt, or None when there is none to start (the caller's answer
    stands: the warning is noted on the attempt, and the run relaunches after the box ends, as before).

    Only for `instance-action: terminate`, the action of every fleet the supervisor starts (one-time spot requests
    cannot stop or hibernate). A `stop` or `hibernate` notice starts nothing: a stopped box keeps its volume and could
    start again with a trainer in it; the reconcile terminates it once stopped and relaunches as after any end."""
    if action != "terminate":
        log.warning("run %s attempt %s: spot notice with instance-action %r: no replacement on the notice", run_id,
                    attempt_number, action)  # fmt: skip
        return None
    for _ in range(5):
        run = supervisor.store.get(run_id)
        if run is None or not run.active or run.stop_requested_at or supervisor.invalid_because(run):
            return None
        current = run.current
        if current is None or current.n != attempt_number or not current.instance_id or current.market != "spot":
            return None
        if run.spec.nodes > 1 or getattr(current, "members", None):  # a gang: gang.py replaces its members
            return None
        now = supervisor.now()
        warned = parse_iso(warned_at) or now
        ends = max(warned + NOTICE, now)
        current.reclaim_warned_at = current.reclaim_warned_at or iso(warned)
        current.end(AttemptEnd.RECLAIMED, "spot interruption notice: replaced at once while it saves", iso(ends))
        supervisor._price(run, current, ends)  # up to the notice's end: the overlap counts in the run's cost
        if current.zone:
            until = now + timedelta(seconds=supervisor.cfg.cooldown_seconds)
            run.cooldown[f"{current.instance_type}@{current.zone}"] = iso(until)
        try:
            answer = supervisor._next_attempt(
                run, why=f"spot interruption notice for attempt {current.n}: replacement started while it saves",
                replaces=current.n,
            )  # fmt: skip
        except StaleRecord:
            continue
        log.info("run %s: attempt %s warned at %s; replacement: %s", run_id, current.n, iso(warned), answer)
        return {**answer, "replaces": current.n}
    return None


def still_saving(run: Any, now: datetime) -> list[Any]:
    """Every earlier attempt whose box may still be writing the run's checkpoint at `now`, oldest first: each with
    an instance whose recorded end plus EC2's shutdown margin is still ahead (a notice's end lies in the future).

    All of them, not the one ending latest: two notices inside one window (attempt 2 warned while it waited for
    attempt 1) leave attempt 1 saving, and attempt 2 may write its final status.json without having waited (a
    failed cold-start part ends its restore wait), so attempt 3 must wait for both. Any earlier attempt counts, not
    only the one the notice named: when the replacement started on the notice found no capacity or died early,
    the attempt after it must still wait for the warned box."""
    current = run.current
    return sorted(
        (a for a in run.attempts
         if a is not current and a.instance_id and may_run_after_its_end(run, a)
         and (parse_iso(a.ended_at) or now) + SHUTDOWN_MARGIN > now),
        key=lambda a: a.n,
    )  # fmt: skip


def may_run_after_its_end(run: Any, attempt: Any) -> bool:
    """Whether the attempt's box may still run after the end its record holds: one ended on a spot notice (ended in
    the record at the notice's end, while the box saves) or a gang's. A single-node attempt ended any other way was
    recorded only once EC2 reported its box `terminated` (powered off) or gone, or stopped (supervisor._step)."""
    return bool(attempt.reclaim_warned_at or attempt.members or run.spec.nodes > 1)


def replaces_tags(run: Any, now: datetime) -> dict[str, str]:
    """The tags the new attempt's instance carries so its agent waits for the old ones' final checkpoints: which
    attempts (`1,2`), and until when at most (the latest of their ends, a notice's, plus EC2's shutdown margin).
    Read at the launch request: an attempt that waited for capacity past the old boxes' ends waits for nothing."""
    saving = still_saving(run, now)
    attempt = run.current
    if attempt is not None:
        attempt.replaces = saving[-1].n if saving else 0  # the record: the latest attempt its agent waits for
    if not saving:
        return {}
    until = max((parse_iso(a.ended_at) or now) for a in saving) + SHUTDOWN_MARGIN
    return {REPLACES_TAG: ",".join(str(a.n) for a in saving), UNTIL_TAG: iso(until)}


def end_outlivers(supervisor: Any, run: Any, now: datetime) -> bool:
    """Terminate a replaced box EC2 has not taken by its notice's end + margin (the handover only waited until then,
    so a box still running would be a second trainer on the run's checkpoint). Returns whether the record changed.

    Only attempts this module ended on a notice (warned, reclaimed, not the current one), between their end + margin
    and OUTLIVE_WINDOW later, not yet terminated; only an instance of this run's attempt with the project's profile
    (supervisor.ours), as every terminate."""
    changed = False
    for attempt in run.attempts:
        ended = parse_iso(attempt.ended_at)
        if attempt is run.current or not attempt.instance_id or not attempt.reclaim_warned_at or ended is None:
            continue
        if attempt.members or attempt.terminated_at or not ended + SHUTDOWN_MARGIN <= now < ended + OUTLIVE_WINDOW:
            continue
        try:
            found = supervisor.clients.ec2.describe_instances(InstanceIds=[attempt.instance_id])["Reservations"]
        except (ClientError, BotoCoreError) as error:  # this look only: the run's reconcile goes on, the next tries
            log.warning("run %s: attempt %s's box %s not described (%s): looked for again at the next reconcile",
                        run.run_id, attempt.n, attempt.instance_id, error)  # fmt: skip
            continue
        instance = next((i for r in found for i in r["Instances"]), None)
        if (instance or {}).get("State", {}).get("Name") not in ("pending", "running"):
            continue
        if not supervisor.ours(instance, run.run_id, attempt.n):
            continue
        try:
            supervisor.clients.ec2.terminate_instances(InstanceIds=[attempt.instance_id])
        except (ClientError, BotoCoreError) as error:  # as the look above: tried again at the next reconcile
            log.warning("run %s: attempt %s's box %s outlived its spot notice but was not terminated (%s): tried "
                        "again at the next reconcile", run.run_id, attempt.n, attempt.instance_id, error)  # fmt: skip
            continue
        attempt.terminated_at, changed = iso(now), True
        # Priced again up to now, its real end: the record's end stays the notice's (what the handover waited for).
        priced = dataclasses.replace(attempt, ended_at=iso(now))
        supervisor._price(run, priced, now)
        for name in ("priced", "cost_usd", "on_demand_usd", "hourly_usd", "price_source"):
            setattr(attempt, name, getattr(priced, name))
        log.warning("run %s: attempt %s's box %s outlived its spot notice (ended %s): terminated", run.run_id,
                    attempt.n, attempt.instance_id, attempt.ended_at)  # fmt: skip
    return changed


def overlap_seconds(old_end: datetime | None, new_start: datetime | None) -> float:
    """How long two boxes of one run ran at once (the old one's end after the new one's start)."""
    if old_end is None or new_start is None:
        return 0.0
    return max(0.0, (old_end - new_start).total_seconds())
