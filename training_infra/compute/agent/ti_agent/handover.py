"""A replacement started on the spot notice restores only after the old attempt's final checkpoint.

The supervisor starts attempt n+1 while attempt n, warned of its spot interruption, still saves
(supervisor/runtime/replacement.py), and tags the new instance `training-infra:replaces=n` (every
earlier attempt that may still save: `replaces=1,2` after two notices in one window). Before
restoring, this agent waits until each of them has its final `status.json` (written by its finalize
after the final checkpoint sync and its manifest), then restores the newest complete checkpoint as always (the
manifest names it: checkpoints.py). The wait is bounded by `replaces-until` (the notice's end + 30 s; at
most WAIT_SECONDS): the old agent writes no checkpoint after its notice's action time (notice_deadline,
checkpoints.Checkpoints.cut_off), so after the bound no old writer is left. Either way, two trainers never
write one checkpoint.

It fails closed: only IMDS's 404 means "no such tag". Any other IMDS error is asked again (IMDS_TRIES, with
backoff; the attempt tag for up to WAIT_SECONDS, then the attempt ends before any trainer: agent.read_tags);
when this tag stays unreadable, the agent cannot know whether a box it replaces still saves, so it waits the
whole WAIT_SECONDS before restoring.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from .imds import ImdsError

TAG_NAME = "replaces"  # training-infra:replaces, read from IMDS instance tags
UNTIL_TAG_NAME = "replaces-until"  # ISO: the old box's end (the notice's) plus EC2's shutdown margin
# Without the until tag: the two-minute notice plus a margin, counted from this box's boot (after the warning).
WAIT_SECONDS = 180
NOTICE_SECONDS = 120  # EC2 acts two minutes after a spot interruption notice
POLL_SECONDS = 5
# IMDS errors other than 404 (a 5xx, a timeout, a refused token) are asked again this many times in all, backing off
# 1, 2, 4 s: about 7 s, bounded retries as the AWS SDKs' own IMDS fetchers make before they give up.
IMDS_TRIES = 4
IMDS_BACKOFF_SECONDS = 1.0


@dataclass(frozen=True)
class Handover:
    """What the wait found: the old attempts, whether all their final statuses arrived, and how long it took."""

    replaced: int  # the latest attempt waited for; 0 with `unread`: not known which
    final_status_seen: bool  # every one of `attempts`
    waited_seconds: float
    unread: str = ""  # why the tags could not be read (IMDS kept failing): the whole bound was waited
    attempts: tuple[int, ...] = ()  # every attempt waited for (`replaces=1,2`)
    missing: tuple[int, ...] = ()  # those whose final status.json had not arrived when the bound passed

    def _named(self, attempts: tuple[int, ...]) -> str:
        names = attempts or (self.replaced,)
        return ("attempt " if len(names) == 1 else "attempts ") + ", ".join(str(n) for n in names)

    def words(self) -> str:
        if self.unread:
            return (f"instance tags not readable ({self.unread}): waited the whole {self.waited_seconds:.0f} s a box "
                    "this one may replace could still save; restoring the newest complete checkpoint")  # fmt: skip
        if self.final_status_seen:
            return (f"{self._named(self.attempts)}'s final status.json is in S3 after {self.waited_seconds:.0f} s: "
                    "its last checkpoint is complete")  # fmt: skip
        return (f"no final status.json from {self._named(self.missing)} after {self.waited_seconds:.0f} s: its box "
                "is gone or writes no more (the handover deadline passed); restoring the newest complete "
                "checkpoint")  # fmt: skip


def wait_for_replaced(
    replaced: int | Sequence[int],
    final_status_exists: Callable[[int], bool],
    *,
    wait_seconds: float = WAIT_SECONDS,
    poll_seconds: float = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Handover:
    """Poll for the old attempts' final statuses until every one exists or `wait_seconds` passed: one attempt's
    status says nothing of another's box (attempt 2 may end early while attempt 1 still saves)."""
    attempts = tuple(sorted({replaced} if isinstance(replaced, int) else set(replaced)))
    missing = list(attempts)
    started = clock()
    while True:
        for n in list(missing):
            try:
                if final_status_exists(n):
                    missing.remove(n)
            except Exception:  # noqa: BLE001,S112 - a failed look is "not yet": the bound still holds
                continue
        waited = clock() - started
        if not missing or waited >= wait_seconds:
            return Handover(max(attempts, default=0), not missing, waited, attempts=attempts, missing=tuple(missing))
        sleep(min(poll_seconds, max(0.0, wait_seconds - waited)))


def notice_deadline(action_body: str, seen_epoch: float) -> float:
    """This box's handover deadline from IMDS `spot/instance-action` ({"action": ..., "time": ISO}): the action's
    time, never later than two minutes after this agent saw the notice (a missing or odd time: that alone). After it
    the agent writes no checkpoint (checkpoints.py); the replacement waits for that time plus UNTIL's margin."""
    latest = seen_epoch + NOTICE_SECONDS
    try:
        body = json.loads(action_body)
        at = datetime.fromisoformat(str(body["time"]).replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError):
        return latest
    return min(at, latest)


def wait_bound(until_tag: str | None, now_epoch: float) -> float:
    """Seconds to wait at most: until the old box must be gone (its tag), never more than WAIT_SECONDS."""
    try:
        until = datetime.fromisoformat((until_tag or "").replace("Z", "+00:00")).timestamp()
    except ValueError:
        return WAIT_SECONDS
    return min(WAIT_SECONDS, max(0.0, until - now_epoch))


def replaced_attempts(tag_value: str | None, attempt: int) -> tuple[int, ...]:
    """The attempts this one waits for (none: ()), from the tag (`2` or `1,2`); anything but earlier attempts is
    ignored."""
    found = set()
    for part in (tag_value or "").split(","):
        if re.fullmatch(r"[1-9][0-9]{0,5}", part.strip()) and int(part) < attempt:
            found.add(int(part))
    return tuple(sorted(found))


def imds_pauses(patience: float = 0) -> list[float]:
    """The pauses between IMDS tries (in units of IMDS_BACKOFF_SECONDS): 1, 2, 4 s (IMDS_TRIES tries in all), or with
    `patience` doubling up to 30 s apart until they add up to it (the attempt tag: up to the handover bound)."""
    if not patience:
        return [2.0**n for n in range(IMDS_TRIES - 1)]
    pauses: list[float] = []
    while sum(pauses) < patience:
        pauses.append(min(30.0, 2.0 ** len(pauses)))
    return pauses


def read_tag(
    get: Callable[[], str | None], *, sleep: Callable[[float], None] | None = None, patience: float = 0
) -> str | None:
    """A tag's value, None only for IMDS's 404 (no such tag); any other IMDS error is asked again, then raised."""
    pauses = imds_pauses(patience)
    for n in range(len(pauses) + 1):
        try:
            return get()
        except ImdsError:
            if n >= len(pauses):
                raise
            (sleep or time.sleep)(IMDS_BACKOFF_SECONDS * pauses[n])
    raise AssertionError("unreachable")  # pragma: no cover


def before_restore(agent: object, *, sleep: Callable[[float], None] | None = None) -> Handover | None:
    """The hook in Agent.run: wait when this attempt is a replacement on the notice, else return at once.
    Tags IMDS would not give (agent.tags_unread, or this read failing after its retries): the whole bound."""
    unread = getattr(agent, "tags_unread", "")
    try:
        value = read_tag(lambda: agent.tag(TAG_NAME), sleep=sleep)  # type: ignore[attr-defined]
    except ImdsError as error:
        value, unread = None, unread or str(error)
    if unread:
        agent.log(f"instance tags not readable ({unread}): waiting {WAIT_SECONDS} s before restoring, in case "  # type: ignore[attr-defined]
                  "this attempt replaces a box that still saves")  # fmt: skip
        (sleep or time.sleep)(WAIT_SECONDS)
        found = Handover(0, False, WAIT_SECONDS, unread=unread)
        agent.log(found.words())  # type: ignore[attr-defined]
        return found
    replaced = replaced_attempts(value, agent.attempt)  # type: ignore[attr-defined]
    if not replaced:
        return None
    bucket = agent.outputs_bucket  # type: ignore[attr-defined]
    s3 = agent.aws.client("s3")  # type: ignore[attr-defined]

    def exists(n: int) -> bool:  # listed, not read: the instance role lists runs/ (a missing key read answers 403)
        key = f"runs/{agent.run_id}/attempts/{n}/status.json"  # type: ignore[attr-defined]
        return bool(s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount"))

    try:
        until = read_tag(lambda: agent.tag(UNTIL_TAG_NAME), sleep=sleep)  # type: ignore[attr-defined]
    except ImdsError:
        until = None  # no bound from the tag: the whole WAIT_SECONDS
    bound = wait_bound(until, time.time())
    names = ", ".join(str(n) for n in replaced)
    agent.log(f"replacement of attempt {names} (spot notice): waiting up to {bound:.0f} s for the final "  # type: ignore[attr-defined]
              "checkpoint of each")  # fmt: skip
    found = wait_for_replaced(replaced, exists, wait_seconds=bound, sleep=sleep or time.sleep)
    agent.log(found.words())  # type: ignore[attr-defined]
    return found
