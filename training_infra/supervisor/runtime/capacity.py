"""Spot capacity: EC2's spot placement scores for a run's pools, cached in the run table, and the zones ranked by them.

GetSpotPlacementScores (EC2 API reference; EC2 User Guide, "Spot placement score",
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-placement-score.html) scores, from 1 to 10, how
likely a spot request for a set of instance types and a target capacity is to succeed; with
`SingleAvailabilityZone=true` it scores each zone (by zone id, the top 10). One score per zone for the
whole set of types: not per (type, zone) pool.

Its limits, as the User Guide states them, and what this module does about each:
- "Request configurations limit": EC2 may limit the number of NEW request configurations (types,
  capacity, regions) within a 24-hour period; configurations already used can be retried. So every
  caller (the CLI's preflight and the supervisor) asks exactly one configuration per run shape: the
  run's types sorted, its capacity in instances, its region; and the answer is cached under that key
  in the run table (SCORE_TTL), read by both, written by the supervisor (the CLI user may not write
  the table: docs/architecture.md, "Trust boundaries").
- "Minimum number of instance types": with one or two types the score is always low, so such scores
  are shown but never used to leave a zone out.
- "Target capacity limit": based on recent spot usage; a request over it is refused, which here, as
  any other failure to get scores, means "no scores": pools are offered as before, never fewer.

Stdlib and boto3 only (this folder is the supervisor's Lambda package).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

try:  # the Lambda package is this folder; the CLI imports it as part of training_infra
    from records import META_KIND, iso, parse_iso
except ImportError:  # pragma: no cover - exercised by the CLI and the tests
    from training_infra.supervisor.runtime.records import META_KIND, iso, parse_iso

log = logging.getLogger(__name__)

# Scores change with spot capacity; a launch waiting for capacity asks each minute: once per quarter hour per
# configuration is fresh enough to rank zones and keeps the calls (and configurations) few.
SCORE_TTL = timedelta(minutes=15)
# The User Guide: fewer types than this and "the returned placement score will always be low".
MIN_TYPES_FOR_SCORES = 3
# 1-3: a request "not likely to succeed" there. Zones at or under this are left out of a spot fleet while
# some zone of the run scores above it (docs/architecture.md, "Spot placement scores").
LOW_SCORE = 3
CACHE_PREFIX = "#placement-"
# The code an attempt's errors carry for a zone left out for its score (not EC2's: the supervisor's own choice).
LEFT_OUT = "LowPlacementScore"


@dataclass(frozen=True)
class Scores:
    """A configuration's zone scores (zone name -> 1..10), when they were asked, and why there are none."""

    types: tuple[str, ...]
    capacity: int
    region: str
    zones: dict[str, int] = field(default_factory=dict)
    fetched_at: str = ""
    cached: bool = False
    missing: str = ""  # why there are no scores ("" when there are)

    @property
    def usable(self) -> bool:
        """Scores that may rank zones: present, and for enough types to mean something."""
        return bool(self.zones) and len(self.types) >= MIN_TYPES_FOR_SCORES

    def of(self, zone: str) -> int | None:
        return self.zones.get(zone)

    def caveat(self) -> str:
        if len(self.types) < MIN_TYPES_FOR_SCORES:
            return (
                f"scored for {len(self.types)} type(s): EC2 scores fewer than {MIN_TYPES_FOR_SCORES} types always "
                "low, so no zone is left out for its score"
            )
        return ""


def cache_key(types: Sequence[str], capacity: int, region: str) -> str:
    """One run-table item per configuration: the sorted types, the capacity (instances) and the region."""
    shape = f"{region}|{capacity}|{','.join(sorted(set(types)))}"
    return CACHE_PREFIX + hashlib.sha256(shape.encode()).hexdigest()[:32]


class PlacementScores:
    """Reads the cache, asks EC2 on a miss and (where allowed) keeps the answer for SCORE_TTL.

    `write=False` for the CLI: its user may read the run table, not write it; the configuration it asks
    is the supervisor's own (same key), which EC2 allows to be asked again.
    """

    def __init__(self, ec2: Any, dynamodb: Any | None, table: str, *, write: bool = True) -> None:
        self.ec2, self.dynamodb, self.table, self.write = ec2, dynamodb, table, write

    def get(self, types: Sequence[str], capacity: int, now: datetime, subnets: Sequence[str]) -> Scores:
        """The zone scores of the run's zones (those of `subnets`) for this configuration."""
        region = self.ec2.meta.region_name
        wanted = tuple(sorted(set(types)))
        key = cache_key(wanted, capacity, region)
        cached = self._read(key, now)
        if cached is not None:
            return Scores(wanted, capacity, region, cached[0], cached[1], cached=True)
        try:
            zones = self._ask(wanted, capacity, region, subnets)
        except Exception as error:  # noqa: BLE001 - advice only: no failure to get it may stop a launch
            code = error.response.get("Error", {}).get("Code", "") if isinstance(error, ClientError) else ""
            log.warning("no spot placement scores (%s): every pool offered", code or type(error).__name__)
            return Scores(wanted, capacity, region, missing=code or type(error).__name__)
        scores = Scores(wanted, capacity, region, zones, iso(now))
        if self.write and self.dynamodb is not None:
            self._put(key, scores, now)
        return scores

    def _ask(self, types: tuple[str, ...], capacity: int, region: str, subnets: Sequence[str]) -> dict[str, int]:
        by_id: dict[str, int] = {}
        request: dict[str, Any] = {
            "InstanceTypes": list(types),
            "TargetCapacity": capacity,
            "TargetCapacityUnitType": "units",
            "SingleAvailabilityZone": True,
            "RegionNames": [region],
        }
        while True:
            answer = self.ec2.get_spot_placement_scores(**request)
            for score in answer.get("SpotPlacementScores", []):
                if score.get("Region", region) == region and score.get("AvailabilityZoneId"):
                    by_id[score["AvailabilityZoneId"]] = int(score.get("Score", 0))
            if not answer.get("NextToken"):
                break
            request["NextToken"] = answer["NextToken"]
        if not by_id:
            return {}
        # Scores name zones by id (the same physical zone in every account), the run by zone name: its subnets
        # say both (DescribeSubnets, which every caller may already call: no other permission needed).
        found = self.ec2.describe_subnets(SubnetIds=list(subnets))["Subnets"]
        return {s["AvailabilityZone"]: by_id[s["AvailabilityZoneId"]] for s in found
                if s.get("AvailabilityZoneId") in by_id}  # fmt: skip

    def _read(self, key: str, now: datetime) -> tuple[dict[str, int], str] | None:
        if self.dynamodb is None or not self.table:
            return None
        try:
            item = self.dynamodb.get_item(TableName=self.table, Key={"run_id": {"S": key}}).get("Item")
        except (ClientError, BotoCoreError) as error:
            log.warning("placement score cache not read: %s", error)
            return None
        if not item:
            return None
        fetched = item.get("fetched_at", {}).get("S", "")
        moment = parse_iso(fetched)
        if moment is None or now - moment >= SCORE_TTL or moment > now + timedelta(minutes=5):
            return None
        try:
            zones = {zone: int(value["N"]) for zone, value in item.get("zones", {}).get("M", {}).items()}
        except (KeyError, TypeError, ValueError):
            return None
        if not all(1 <= score <= 10 for score in zones.values()):
            return None
        return zones, fetched

    def _put(self, key: str, scores: Scores, now: datetime) -> None:
        try:
            self.dynamodb.put_item(
                TableName=self.table,
                Item={
                    "run_id": {"S": key},
                    "kind": {"S": META_KIND},
                    "fetched_at": {"S": scores.fetched_at},
                    # Epoch seconds: a DynamoDB TTL on `expires` would remove it (the items are few either way).
                    "expires": {"N": str(int((now + SCORE_TTL).timestamp()))},
                    "types": {"S": ",".join(scores.types)},
                    "capacity": {"N": str(scores.capacity)},
                    "zones": {"M": {zone: {"N": str(value)} for zone, value in scores.zones.items()}},
                },
            )
        except (ClientError, BotoCoreError) as error:  # a cache that is not written costs one more call, no more
            log.warning("placement scores not cached: %s", error)


def preferred_pools(
    offered: Sequence[tuple[str, str]], zones: Mapping[str, str], scores: Scores
) -> tuple[list[tuple[str, str]], list[str]]:
    """(the (type, subnet) pools a spot fleet is offered, the zones left out for a low score).

    A zone scoring LOW_SCORE or less is left out while another of the run's zones scores above it; a zone
    EC2 did not score (only the top 10 are returned) is kept. Without usable scores nothing is left out.
    """
    if not scores.usable:
        return list(offered), []
    run_zones = {zones[s] for _t, s in offered if s in zones}
    best = max((scores.of(z) or 0 for z in run_zones), default=0)
    if best <= LOW_SCORE:
        return list(offered), []
    low = sorted(z for z in run_zones if (scores.of(z) is not None and scores.of(z) <= LOW_SCORE))
    kept = [(t, s) for t, s in offered if zones.get(s) not in low]
    return kept, low


def ranked_zones(scores: Scores, zones: Sequence[str]) -> list[tuple[str, int | None]]:
    """The run's zones, best score first (unscored last), for people to read."""
    return sorted(((z, scores.of(z)) for z in zones), key=lambda item: (-(item[1] or 0), item[0]))


def describe(scores: Scores, zones: Sequence[str]) -> str:
    """`us-east-1a 9, us-east-1b 2 (g5.xlarge, g6.xlarge; 1 instance; 10: very likely to get it)`, or why none."""
    if scores.missing:
        return f"skipped: not available here ({scores.missing})"
    if not scores.zones:
        return "EC2 returned no score for this region"
    shown = ", ".join(f"{zone} {score if score is not None else '-'}" for zone, score in ranked_zones(scores, zones))
    words = f"{shown} ({', '.join(scores.types)}; {scores.capacity} instance(s); 1-10, 10: very likely to succeed"
    words += ", cached" if scores.cached else ""
    return words + ")"


# ---- Capacity Blocks: the block-ending warning ----------------------------------------------------------------

# EventBridge, 40 minutes before a Capacity Block ends; its instances begin to terminate 10 minutes later (EC2 User
# Guide, "Monitor Capacity Blocks using EventBridge"): detail {"capacity-reservation-id", "end-date"}. The guide
# names its detail-type two ways (the example's "Capacity Block Expiration Warning" in the current English page,
# "Capacity Block Reservation Expiration Warning" in other versions of it): the rule and the handler take both.
BLOCK_EXPIRING = ("Capacity Block Expiration Warning", "Capacity Block Reservation Expiration Warning")
BLOCK_STOP_REASON = "capacity-block"  # the stop tag's value: the agent checkpoints and stops as for a user's stop
_RESERVATION_ID = re.compile(r"^cr-[0-9a-f]{8,17}$")


def block_expiring(supervisor: Any, event: Mapping[str, Any]) -> dict[str, Any]:
    """Stop gracefully every managed run with an instance in the ending block: the stop tag now (the agent saves a
    checkpoint and ends), the supervisor's terminate after its stop timeout, no relaunch (the run ends `deadline`).

    The block is found from EC2 (DescribeInstances by `capacity-reservation-id`), not from the record, and only
    instances the supervisor may act on (project profile, managed and run tags) count.
    """
    detail = event.get("detail") or {}
    reservation = detail.get("capacity-reservation-id", "")
    if not isinstance(reservation, str) or not _RESERVATION_ID.match(reservation):
        return {"ignored": f"capacity-reservation-id: got {reservation!r}; allowed: cr-..."}
    cfg = supervisor.cfg
    pages = supervisor.clients.ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": "capacity-reservation-id", "Values": [reservation]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
            {"Name": f"tag:{cfg.managed_tag}", "Values": ["true"]},
        ]
    )
    stopping: list[str] = []
    for page in pages:
        for found in page.get("Reservations", []):
            for instance in found.get("Instances", []):
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                run_id = tags.get(cfg.run_id_tag, "")
                if not run_id or not supervisor.ours(instance, run_id) or run_id in stopping:
                    continue
                try:
                    supervisor.request_stop(run_id, reason=BLOCK_STOP_REASON)
                except KeyError:  # an instance whose run has no record: the reaper's, not ours
                    continue
                stopping.append(run_id)
    return {"capacity_reservation": reservation, "ends_at": detail.get("end-date", ""), "stopping": stopping}
