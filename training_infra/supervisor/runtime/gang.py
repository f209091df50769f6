"""Gang runs (issue 25): N instances started all-or-nothing as one attempt, a lost non-host replaced in place.

docs/architecture.md, "Multi-node runs (gangs)". The supervisor (supervisor.py) hands a run with
`spec.nodes > 1` to this module at three points: the launch of an open attempt (`launch_gang`), the
watch of a launched one (`GangWatcher.step`) and the side effects that must reach every member
(stop tags, pricing, releasing placement groups). Everything else (claims, conditional writes, the
run's classification into relaunch / restart on errors / end) stays the single-node code.

One try = one EC2 Fleet `instant` request for one pool (one instance type, one subnet) with
TotalTargetCapacity = MinTargetCapacity = N and SingleInstanceType/SingleAvailabilityZone (which
MinTargetCapacity requires), in the attempt's cluster placement group: either N instances start or
none. After the fleet returns, members are ordered by instance id and tagged with their node index and
node 0's address as the c10d rendezvous endpoint (the contract with the agent, docs/agent.md).

Stdlib and boto3 only: this folder is the supervisor's Lambda package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

try:  # the Lambda package is this folder; the CLI imports it as part of training_infra
    import ledger
    from records import Attempt, AttemptEnd, Member, MemberState, Run, RunState, iso, parse_iso
except ImportError:  # pragma: no cover - exercised by the CLI and the tests
    from training_infra.supervisor.runtime import ledger
    from training_infra.supervisor.runtime.records import (
        Attempt,
        AttemptEnd,
        Member,
        MemberState,
        Run,
        RunState,
        iso,
        parse_iso,
    )

log = logging.getLogger()

RENDEZVOUS_PORT = 29400  # torchrun's c10d default
# A fleet's new instances may not be listed by DescribeInstances at once (eventual consistency).
DESCRIBE_RETRIES = 3
DESCRIBE_PAUSE_SECONDS = 1.0
# Fleet requests one reconcile may make (one pool each, spot then the fallback): the next minute goes on with the
# next pools, so one call stays inside the function's 50 s.
MAX_TRIES_PER_RECONCILE = 4
# A survivor's own end while a lost node's replacement has not joined: its rendezvous gave up (join_timeout), or it
# stalled or idled while it waited. The gang then relaunches as the next attempt, a preemption, not the run's error.
WAITING_ENDS = (AttemptEnd.FAILED, AttemptEnd.STALLED, AttemptEnd.IDLE)
# The agent's rendezvous join_timeout beyond gang_replace_seconds: its default image pull bound (1800 s) and its
# boot/restore margin (300 s) (ti_agent/gang.py join_timeout_seconds; a test holds them equal).
AGENT_JOIN_MARGIN_SECONDS = 1800 + 300
# DescribeInstanceTypes' answer per type, kept while the Lambda is warm (a type's EFA support never changes).
_EFA_SUPPORT: dict[str, bool] = {}


def _sup() -> Any:
    """supervisor.py (which imports this module): the package's when there is one, since a bare `supervisor` may
    be another module on the path (the tests' folder); the Lambda package's own otherwise."""
    try:
        from training_infra.supervisor.runtime import supervisor
    except ImportError:  # pragma: no cover - the Lambda package
        import supervisor
    return supervisor


# ------------------------------------------------------------------------------------------ EFA


def efa_support(ec2: Any, instance_types: tuple[str, ...] | list[str]) -> dict[str, bool]:
    """Whether each type supports EFA, from DescribeInstanceTypes (NetworkInfo.EfaSupported), cached."""
    unknown = sorted({t for t in instance_types if t not in _EFA_SUPPORT})
    if unknown:
        answer = ec2.describe_instance_types(InstanceTypes=unknown)
        for described in answer.get("InstanceTypes", []):
            _EFA_SUPPORT[described["InstanceType"]] = bool(described.get("NetworkInfo", {}).get("EfaSupported"))
        for instance_type in unknown:
            _EFA_SUPPORT.setdefault(instance_type, False)
    return {t: _EFA_SUPPORT[t] for t in instance_types}


def network_data(data: Mapping[str, Any], groups: list[str], *, efa: bool) -> dict[str, Any]:
    """The run template's version-1 data with a gang's network: the stack's group and the attempt's gang group, as
    SecurityGroupIds, or on one EFA interface (device 0, network card 0) for a type that takes EFA (a template with
    NetworkInterfaces may not also name SecurityGroupIds). Fleet overrides cannot name groups (EC2 API reference:
    FleetLaunchTemplateOverridesRequest), so a gang attempt launches from a version of its own. The subnet comes
    from the fleet's override, as for every other launch."""
    gang = {key: value for key, value in data.items() if key not in ("SecurityGroupIds", "SecurityGroups")}
    if not efa:
        gang["SecurityGroupIds"] = list(groups)
        return gang
    gang["NetworkInterfaces"] = [{
        "DeviceIndex": 0, "NetworkCardIndex": 0, "InterfaceType": "efa", "Groups": list(groups),
        "DeleteOnTermination": True,
    }]  # fmt: skip
    return gang


def gang_template_version(clients: Any, run: Run, cfg: Any, groups: list[str], *, efa: bool) -> str:
    """The run template's version for this gang network: made by the supervisor from version 1 (which the trust
    check compared with the stack's template), found again by content (a retry, a crashed launch's) and checked to
    be exactly that before every use."""
    ec2, template_id = clients.ec2, run.spec.launch_template_id
    versions = ec2.describe_launch_template_versions(LaunchTemplateId=template_id)["LaunchTemplateVersions"]
    by_number = {str(v["VersionNumber"]): v["LaunchTemplateData"] for v in versions}
    wanted = network_data(by_number["1"], groups, efa=efa)
    expected = _normal(wanted)
    for number, data in sorted(by_number.items(), key=lambda item: int(item[0])):
        if number != "1" and _normal(data) == expected:
            return number
    created = ec2.create_launch_template_version(
        LaunchTemplateId=template_id,
        LaunchTemplateData=wanted,
        VersionDescription=f"gang network{' (EFA)' if efa else ''} (training-infra supervisor)",
    )
    return str(created["LaunchTemplateVersion"]["VersionNumber"])


def _normal(data: Mapping[str, Any]) -> str:
    """Launch-template data compared without what EC2 adds to an interface it echoes back."""
    data = dict(data)
    data["NetworkInterfaces"] = [
        {k: v for k, v in interface.items() if k in ("DeviceIndex", "NetworkCardIndex", "InterfaceType", "Groups")}
        for interface in data.get("NetworkInterfaces", [])
    ]
    data["SecurityGroupIds"] = list(data.get("SecurityGroupIds") or [])
    data.pop("SecurityGroups", None)
    return json.dumps(data, sort_keys=True, default=str)


# ------------------------------------------------------------------------------- security groups

# The gang group's only rules (AWS's EFA guide: all traffic from and to the group itself, both directions).
SELF_RULE = "-1"


def _self_permission(group_id: str) -> list[dict[str, Any]]:
    return [{"IpProtocol": SELF_RULE, "UserIdGroupPairs": [{"GroupId": group_id}]}]


def _is_self_rule(permission: Mapping[str, Any], group_id: str) -> bool:
    pairs = permission.get("UserIdGroupPairs") or []
    return (permission.get("IpProtocol") == SELF_RULE and [p.get("GroupId") for p in pairs] == [group_id]
            and not permission.get("IpRanges") and not permission.get("Ipv6Ranges")
            and not permission.get("PrefixListIds"))  # fmt: skip


def _vpc(clients: Any, cfg: Any) -> str:
    """The stack's VPC: the one its instance security group is in."""
    (group,) = clients.ec2.describe_security_groups(GroupIds=[cfg.security_group_id])["SecurityGroups"]
    return group["VpcId"]


def gang_security_group(clients: Any, cfg: Any, run: Run, attempt: Attempt) -> str:
    """The attempt's security group (docs/architecture.md, "Multi-node runs": the network): made on its first try in
    the stack's VPC, tagged created-by/run/attempt, with exactly one ingress and one egress rule, all traffic from and
    to itself, and EC2's default allow-all egress revoked. Made again or completed when a launch died half way (its
    name is the attempt's), so every launch of the attempt finds it in exactly that shape."""
    name = group_name(cfg, run, attempt)
    vpc = _vpc(clients, cfg)
    tags = {cfg.created_by_tag: "supervisor", cfg.run_id_tag: run.run_id, cfg.attempt_tag: str(attempt.n),
            cfg.managed_tag: "true"}  # fmt: skip
    try:
        group_id = clients.ec2.create_security_group(
            GroupName=name, VpcId=vpc,
            Description=f"training-infra gang {run.run_id} attempt {attempt.n}: its members reach each other only",
            TagSpecifications=[{"ResourceType": "security-group",
                                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
        )["GroupId"]  # fmt: skip
    except ClientError as error:
        if error.response["Error"]["Code"] != "InvalidGroup.Duplicate":
            raise
        found = clients.ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc]},
            {"Name": f"tag:{cfg.created_by_tag}", "Values": ["supervisor"]},
            {"Name": f"tag:{cfg.run_id_tag}", "Values": [run.run_id]},
        ])["SecurityGroups"]  # fmt: skip
        if not found:
            raise _sup().LaunchRefused(f"security group {name} exists in {vpc} but was not made by the supervisor "
                                       f"for run {run.run_id}") from None  # fmt: skip
        group_id = found[0]["GroupId"]
    _only_self_rules(clients, group_id)
    attempt.security_group = group_id
    return group_id


def _only_self_rules(clients: Any, group_id: str) -> None:
    """Ingress and egress: the self rule and nothing else (a new group's default egress revoked). EC2 lists rules of
    one protocol and port range as one permission (the self pair beside ::/0, say), so each is taken apart into one
    permission per source or destination and every part but the self pair revoked."""
    (group,) = clients.ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    for direction, permissions in (("ingress", group.get("IpPermissions", [])),
                                   ("egress", group.get("IpPermissionsEgress", []))):  # fmt: skip
        parts = [part for permission in permissions for part in _parts(permission)]
        others = [part for part in parts if not _is_self_rule(part, group_id)]
        if others:
            getattr(clients.ec2, f"revoke_security_group_{direction}")(GroupId=group_id, IpPermissions=others)
        if len(others) == len(parts):  # no self rule yet
            getattr(clients.ec2, f"authorize_security_group_{direction}")(
                GroupId=group_id, IpPermissions=_self_permission(group_id)
            )


def _parts(permission: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A described permission as RevokeSecurityGroup* takes it back: one per address range, prefix list or group."""
    base = {k: permission[k] for k in ("IpProtocol", "FromPort", "ToPort") if permission.get(k) is not None}
    return [
        *({**base, "IpRanges": [{"CidrIp": r["CidrIp"]}]} for r in permission.get("IpRanges") or []),
        *({**base, "Ipv6Ranges": [{"CidrIpv6": r["CidrIpv6"]}]} for r in permission.get("Ipv6Ranges") or []),
        *(
            {**base, "PrefixListIds": [{"PrefixListId": r["PrefixListId"]}]}
            for r in permission.get("PrefixListIds") or []
        ),
        *({**base, "UserIdGroupPairs": [{"GroupId": r["GroupId"]}]} for r in permission.get("UserIdGroupPairs") or []),
    ]


def delete_security_group(clients: Any, group_id: str) -> bool:
    """Delete a gang group; False while EC2 refuses (its members' interfaces linger a few minutes after they
    terminated: DependencyViolation): the next minute's sweep retries."""
    try:
        clients.ec2.delete_security_group(GroupId=group_id)
    except ClientError as error:
        code = error.response["Error"]["Code"]
        if code == "InvalidGroup.NotFound":
            return True
        log.info("security group %s not deleted yet (%s); the next minute retries", group_id, code)
        return False
    return True


def sweep_security_groups(sv: Any) -> list[str]:
    """Every minute: delete the gang groups no open attempt needs (the attempt ended, its run ended, or no record:
    a crashed launch's). A group is made only after its attempt's claim is stored, so the record read here, after
    the group was listed, always knows its attempt. Returns the groups deleted."""
    cfg = sv.cfg
    if not cfg.security_group_id:
        return []
    groups = sv.clients.ec2.describe_security_groups(Filters=[
        {"Name": f"tag:{cfg.created_by_tag}", "Values": ["supervisor"]},
        {"Name": "tag-key", "Values": [cfg.attempt_tag]},
    ])["SecurityGroups"]  # fmt: skip
    deleted = []
    for group in groups:
        tags = {t["Key"]: t["Value"] for t in group.get("Tags", [])}
        run = sv.store.get(tags.get(cfg.run_id_tag, "")) if tags.get(cfg.run_id_tag) else None
        number = tags.get(cfg.attempt_tag, "")
        attempt = next((a for a in run.attempts if str(a.n) == number), None) if run is not None else None
        if (
            run is not None
            and run.active
            and ((attempt is not None and not attempt.ended_at) or number == str(len(run.attempts) + 1))
        ):  # an open attempt's, or the next claim's (a capacity wait tries again next minute with that number)
            continue
        if delete_security_group(sv.clients, group["GroupId"]):
            deleted.append(group["GroupId"])
    return deleted


# ------------------------------------------------------------------------------ placement groups


def group_name(cfg: Any, run: Run, attempt: Attempt) -> str:
    return f"{cfg.run_template_prefix}{run.run_id}-{attempt.n}"


def placement_group(clients: Any, cfg: Any, run: Run, attempt: Attempt) -> str:
    """The attempt's cluster placement group, made on its first try (docs/architecture.md: per attempt, because a
    cluster group holds one zone once it holds instances and the next attempt may go to another zone). "" when
    the stack turns placement groups off (the local AWS, which has none)."""
    if not cfg.placement_strategy:
        return ""
    name = attempt.placement_group or group_name(cfg, run, attempt)
    tags = {cfg.created_by_tag: "supervisor", cfg.run_id_tag: run.run_id, cfg.managed_tag: "true"}
    try:
        clients.ec2.create_placement_group(
            GroupName=name, Strategy=cfg.placement_strategy,
            TagSpecifications=[{"ResourceType": "placement-group",
                                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
        )  # fmt: skip
    except ClientError as error:
        if error.response["Error"]["Code"] != "InvalidPlacementGroup.Duplicate":
            raise
    attempt.placement_group = name
    return name


def release_placement_groups(clients: Any, cfg: Any, run: Run, keep: str = "") -> None:
    """Delete the run's placement groups but `keep` (free, but 500 per account): only those tagged as made by the
    supervisor for this run. One still holding terminating instances is refused by EC2; a later call retries."""
    if not cfg.placement_strategy:
        return
    try:
        groups = clients.ec2.describe_placement_groups(
            Filters=[{"Name": f"tag:{cfg.run_id_tag}", "Values": [run.run_id]}]
        )["PlacementGroups"]
    except ClientError as error:
        log.warning("placement groups of %s not listed: %s", run.run_id, error)
        return
    for group in groups:
        tags = {t["Key"]: t["Value"] for t in group.get("Tags", [])}
        name = group.get("GroupName", "")
        if name == keep or tags.get(cfg.created_by_tag) != "supervisor" or tags.get(cfg.run_id_tag) != run.run_id:
            continue
        try:
            clients.ec2.delete_placement_group(GroupName=name)
        except ClientError as error:
            log.info("placement group %s not deleted yet (%s); a later reconcile retries", name, error)


# -------------------------------------------------------------------------------------- launching


def _client_token(run: Run, attempt: Attempt, market: str, pool: str, node: str) -> str:
    digest = hashlib.sha256(f"{run.run_id}/{attempt.n}/{market}/{attempt.claimed_at}/{pool}/{node}".encode())
    return f"ti-{digest.hexdigest()[:48]}"


def fleet_request(
    run: Run, attempt: Attempt, market: str, pool: tuple[str, str], group: str, version: str, cfg: Any, *,
    count: int, extra_tags: Mapping[str, str] | None = None, token_node: str = "gang",  # noqa: S107 - a client token part, no secret
) -> dict[str, Any]:  # fmt: skip
    """One pool, `count` instances, all or none: the single-node request narrowed to a gang's try."""
    instance_type, subnet = pool
    override: dict[str, Any] = {"InstanceType": instance_type, "SubnetId": subnet}
    if group:
        override["Placement"] = {"GroupName": group}
    cap = run.spec.max_price_usd
    if cap and market == "spot":
        override["MaxPrice"] = f"{cap:g}"
    request = _sup()._fleet_request(run, attempt.n, market, [override], cfg)
    request["ClientToken"] = _client_token(run, attempt, market, f"{instance_type}@{subnet}", token_node)
    request["TargetCapacitySpecification"]["TotalTargetCapacity"] = count
    request["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]["Version"] = version
    options = request["SpotOptions" if market == "spot" else "OnDemandOptions"]
    # MinTargetCapacity needs SingleInstanceType or SingleAvailabilityZone (EC2 API reference): both, one pool.
    options.update({"MinTargetCapacity": count, "SingleInstanceType": True, "SingleAvailabilityZone": True})
    if cap:
        options["MaxTotalPrice"] = f"{cap * count:g}"  # the cap is per instance; the fleet's is for all of it
    tags = request["TagSpecifications"][0]["Tags"]
    tags.append({"Key": cfg.nodes_tag, "Value": str(run.spec.nodes)})
    tags.extend({"Key": k, "Value": v} for k, v in (extra_tags or {}).items())
    return request


def launch_gang(clients: Any, run: Run, cfg: Any, now: datetime, prices: Any = None) -> Attempt:
    """Start the open attempt's N instances, or record why not (the same outcomes as the single-node `launch`)."""
    sup = _sup()
    attempt = run.current
    assert attempt is not None and not attempt.instance_id, "launch needs an open attempt without an instance"
    if adopt_members(clients, run, attempt, cfg, now):
        return attempt
    zones = sup._subnet_zones(clients, list(run.spec.subnet_ids))
    cooled = {key for key, until in run.cooldown.items() if (parse_iso(until) or now) > now}
    every = sup.pools(run.spec, zones)
    preferred = [(t, s) for t, s in every if sup.pool_key(t, zones[s]) not in cooled] or every
    # The streak of capacity failures so far (kept on the previous row): each minute starts at the next pools.
    previous = run.attempts[-2] if len(run.attempts) >= 2 else None
    streak = previous.tries if previous is not None and previous.end_reason == AttemptEnd.CAPACITY else 0
    start = (streak * MAX_TRIES_PER_RECONCILE) % max(1, len(preferred))
    order = (preferred[start:] + preferred[:start])[:MAX_TRIES_PER_RECONCILE]
    efa = efa_support(clients.ec2, run.spec.instance_types)
    # The earlier attempts' groups, now that their instances ended (this attempt's, from a try before, stays).
    release_placement_groups(clients, cfg, run, keep=group_name(cfg, run, attempt))
    errors: list[dict[str, str]] = []
    priced_out: list[tuple[tuple[str, str], float, str]] = []
    cap = run.spec.max_price_usd
    group = placement_group(clients, cfg, run, attempt) if order else ""
    network = [cfg.security_group_id, gang_security_group(clients, cfg, run, attempt)] if order else []
    for instance_type, subnet in order:
        version = gang_template_version(clients, run, cfg, network, efa=efa[instance_type])
        for market in sup._markets(run.spec):
            if cap:
                prices = prices or sup.Prices(ec2=clients.ec2, region=clients.ec2.meta.region_name,
                                              pricing=clients.pricing)  # fmt: skip
                fitting, cheapest = sup._under_cap(prices, market, [(instance_type, subnet)], zones, cap)
                if not fitting:
                    if cheapest is not None:
                        priced_out.append((*cheapest, market))
                    continue
            request = fleet_request(run, attempt, market, (instance_type, subnet), group, version, cfg,
                                    count=run.spec.nodes)  # fmt: skip
            ids, pool_errors = _create_fleet(clients, request, zones, market)
            if len(ids) >= run.spec.nodes:
                _record_members(clients, cfg, run, attempt, ids, (instance_type, subnet), zones, market, now)
                attempt.launch_template_version = version  # its replacements join the same network
                return attempt
            if ids:  # MinTargetCapacity makes this impossible on AWS; never keep part of a gang
                clients.ec2.terminate_instances(InstanceIds=ids)
                pool_errors.append({
                    "market": market, "code": "PartialGang", "pool": f"{instance_type}@{zones[subnet]}",
                    "message": f"{len(ids)} of {run.spec.nodes} started; terminated",
                })  # fmt: skip
            errors.extend(pool_errors)
    if priced_out and not errors:
        message = sup.cap_message(cap, min(priced_out, key=lambda item: item[1]))
        if not run.launched:
            raise sup.LaunchRefused(f"{message}: raise --max-price or add cheaper --instance-types")
        attempt.end(AttemptEnd.CAPACITY, f"{message} (prices move)", iso(now))
        return attempt
    attempt.errors = errors[-12:]
    attempt.end(AttemptEnd.CAPACITY, f"gang of {run.spec.nodes}: {sup._capacity_message(errors)}", iso(now))
    return attempt


def _create_fleet(
    clients: Any, request: dict[str, Any], zones: Mapping[str, str], market: str
) -> tuple[list[str], list[dict[str, str]]]:
    """(instance ids started, capacity errors); raises LaunchRefused for what asking again cannot fix."""
    sup = _sup()
    try:
        response = clients.ec2.create_fleet(**request)
    except ClientError as error:
        code, message = error.response["Error"]["Code"], error.response["Error"].get("Message", "")
        if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
            raise sup.LaunchRefused(f"EC2 refused the launch: {code} (not allowed to launch)") from None
        if code not in sup.CAPACITY_ERRORS and code not in sup.TRANSIENT_ERRORS:
            raise sup.LaunchRefused(f"EC2 refused the launch: {code}: {message}") from None
        return [], [{"market": market, "code": code, "message": message}]
    ids = [i for launched in response.get("Instances", []) for i in launched.get("InstanceIds", [])]
    pool_errors = response.get("Errors", [])
    known = (*sup.CAPACITY_ERRORS, *sup.TRANSIENT_ERRORS)
    refused = [e for e in pool_errors if e.get("ErrorCode") not in known]
    if refused and not ids:
        first = refused[0]
        raise sup.LaunchRefused(f"EC2 refused the launch: {first.get('ErrorCode')}: {first.get('ErrorMessage', '')}")
    return ids, [
        {"market": market, "code": e.get("ErrorCode", ""), "message": e.get("ErrorMessage", ""),
         "pool": sup._override_name(e, zones)}
        for e in pool_errors
    ]  # fmt: skip


def _describe(clients: Any, instance_ids: list[str]) -> dict[str, dict[str, Any]]:
    if not instance_ids:
        return {}
    try:
        reservations = clients.ec2.describe_instances(InstanceIds=instance_ids)["Reservations"]
    except ClientError as error:
        if error.response["Error"]["Code"] != "InvalidInstanceID.NotFound" or len(instance_ids) == 1:
            if error.response["Error"]["Code"] == "InvalidInstanceID.NotFound":
                return {}
            raise
        found: dict[str, dict[str, Any]] = {}
        for instance_id in instance_ids:  # one unknown id fails the whole call: ask one by one
            found.update(_describe(clients, [instance_id]))
        return found
    return {i["InstanceId"]: i for r in reservations for i in r["Instances"]}


def _member_of(instance: Mapping[str, Any], node: int, market: str, now: datetime) -> Member:
    return Member(
        node=node, instance_id=instance["InstanceId"], instance_type=instance.get("InstanceType", ""),
        zone=instance.get("Placement", {}).get("AvailabilityZone", ""), subnet_id=instance.get("SubnetId", ""),
        private_ip=instance.get("PrivateIpAddress", ""),
        market=market or ("spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand"), started_at=iso(now),
    )  # fmt: skip


def rendezvous(host: Member) -> str:
    return f"{host.private_ip}:{RENDEZVOUS_PORT}"


def _record_members(
    clients: Any, cfg: Any, run: Run, attempt: Attempt, ids: list[str], pool: tuple[str, str],
    zones: Mapping[str, str], market: str, now: datetime,
) -> None:  # fmt: skip
    """Order the gang by instance id (node 0 hosts the rendezvous), tag each its node and all the endpoint.

    Every id the fleet returned is a member, described or not: an instance EC2 does not list yet (eventual
    consistency) is asked for again a few times, and a host without its address yet is tagged by the next
    reconcile (`GangWatcher.step`), so no started instance is ever left out of the record."""
    ordered = sorted(ids)
    described = _describe(clients, ordered)
    for _ in range(DESCRIBE_RETRIES):
        if all(described.get(i, {}).get("PrivateIpAddress") for i in ordered):
            break
        time.sleep(DESCRIBE_PAUSE_SECONDS)
        described = _describe(clients, ordered)
    instance_type, subnet = pool
    attempt.members = [
        _member_of(described.get(i) or {"InstanceId": i, "InstanceType": instance_type, "SubnetId": subnet,
                                         "Placement": {"AvailabilityZone": zones.get(subnet, "")}}, k, market, now)
        for k, i in enumerate(ordered)
    ]  # fmt: skip
    members = attempt.members
    _tag_nodes(clients, cfg, members)
    host = members[0]
    _sup()._record_instance(attempt, host.instance_id, host.instance_type, host.zone or zones.get(host.subnet_id),
                            host.subnet_id, host.market, now)  # fmt: skip


def _tag_nodes(clients: Any, cfg: Any, members: list[Member]) -> None:
    """Each member's node and node 0's endpoint; nothing while node 0's address is unknown (the agents wait)."""
    if not members[0].private_ip:
        return
    endpoint = rendezvous(members[0])
    for member in members:
        clients.ec2.create_tags(
            Resources=[member.instance_id],
            Tags=[{"Key": cfg.node_tag, "Value": str(member.node)}, {"Key": cfg.rendezvous_tag, "Value": endpoint}],
        )


def adopt_members(
    clients: Any, run: Run, attempt: Attempt, cfg: Any, now: datetime, *, end_partial: bool = False
) -> bool:
    """A launch of this attempt that died after its fleet returned: take its instances (and tag them, again).

    Fewer than N listed is no gang to adopt: left alone (a concurrent launch of the same claim may be listed
    only in part yet; its fleet's ClientToken makes the launch that follows return the same instances), or
    ended with `end_partial` (a stop during the launch)."""
    sup = _sup()
    reservations = clients.ec2.describe_instances(Filters=[
        {"Name": f"tag:{cfg.run_id_tag}", "Values": [run.run_id]},
        {"Name": f"tag:{cfg.attempt_tag}", "Values": [str(attempt.n)]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]},
    ])["Reservations"]  # fmt: skip
    found = [i for r in reservations for i in r["Instances"] if sup.is_ours(cfg, i, run.run_id, attempt.n)]
    if len(found) < run.spec.nodes:
        if found and end_partial:
            clients.ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in found])
        return False
    found.sort(key=lambda i: i["InstanceId"])
    attempt.members = [_member_of(instance, k, "", now) for k, instance in enumerate(found[: run.spec.nodes])]
    # The version its fleet named (found by content), so that a replacement joins the same security group.
    host_type = attempt.members[0].instance_type
    network = [cfg.security_group_id, gang_security_group(clients, cfg, run, attempt)]
    efa = efa_support(clients.ec2, [host_type])[host_type]
    attempt.launch_template_version = gang_template_version(clients, run, cfg, network, efa=efa)
    _tag_nodes(clients, cfg, attempt.members)
    host = attempt.members[0]
    sup._record_instance(attempt, host.instance_id, host.instance_type, host.zone, host.subnet_id, host.market, now)
    return True


def launch_replacement(clients: Any, run: Run, attempt: Attempt, cfg: Any, node: int, now: datetime) -> Member | None:
    """One instance for a lost non-host node: same type, subnet, placement group, template version and attempt,
    launched with its node and the rendezvous already in its tags. None when no pool had it this time."""
    sup = _sup()
    host = attempt.live_member(0)
    assert host is not None and node != 0
    # The attempt's own group and version, found again (by name and tags, by content) rather than read from the
    # record: the replacement joins exactly the group its attempt's members are in, and nothing else.
    network = [cfg.security_group_id, gang_security_group(clients, cfg, run, attempt)]
    efa = efa_support(clients.ec2, [host.instance_type])[host.instance_type]
    version = gang_template_version(clients, run, cfg, network, efa=efa)
    pool = (host.instance_type, host.subnet_id)
    zones = {host.subnet_id: host.zone}
    tags = {cfg.node_tag: str(node), cfg.rendezvous_tag: rendezvous(host)}
    replaced = len(attempt.members_of(node))  # a fresh token per replacement of this node
    for market in sup._markets(run.spec):
        request = fleet_request(run, attempt, market, pool, attempt.placement_group, version, cfg, count=1,
                                extra_tags=tags, token_node=f"node-{node}-{replaced}")  # fmt: skip
        ids, errors = _create_fleet(clients, request, zones, market)
        if ids:
            described = _describe(clients, ids)
            if ids[0] in described:
                return _member_of(described[ids[0]], node, market, now)
        attempt.errors = (attempt.errors + errors)[-12:]
    return None


# ---------------------------------------------------------------------------------------- watching


def node_status_key(cfg: Any, run_id: str, attempt: int, node: int) -> str:
    return f"{cfg.runs_prefix}{run_id}/attempts/{attempt}/nodes/{node}/status.json"


def _node_status(clients: Any, cfg: Any, run: Run, attempt: Attempt, node: int) -> dict[str, Any] | None:
    try:
        body = clients.s3.get_object(Bucket=cfg.outputs_bucket, Key=node_status_key(cfg, run.run_id, attempt.n, node))
    except ClientError as error:
        if error.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    try:
        status = json.loads(body["Body"].read())
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def _progressed_since(clients: Any, cfg: Any, run: Run, attempt: Attempt, member: Member) -> bool:
    """Whether node `member.node`'s progress.json (its agent's copy of the trainer's heartbeat) changed after
    `member` started: the replacement trained a step with the others, so the gang met again."""
    key = node_status_key(cfg, run.run_id, attempt.n, member.node).removesuffix("status.json") + "progress.json"
    try:
        body = clients.s3.get_object(Bucket=cfg.outputs_bucket, Key=key)["Body"].read()
        changed = parse_iso(json.loads(body).get("changed_at"))
    except ClientError as error:
        if error.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
            return False
        raise
    except (ValueError, AttributeError):  # not JSON, or null: no progress reported
        return False
    started = parse_iso(member.started_at)
    return changed is not None and started is not None and changed >= started


def as_attempt(member: Member, attempt: Attempt) -> Attempt:
    """A member seen as a one-instance attempt: what classify and the ledger read."""
    return Attempt(
        n=attempt.n, instance_id=member.instance_id, instance_type=member.instance_type, zone=member.zone,
        subnet_id=member.subnet_id, market=member.market, started_at=member.started_at, ended_at=member.ended_at,
        reclaim_warned_at=member.reclaim_warned_at, price_usd=member.price_usd, unhealthy=attempt.unhealthy,
        impaired_since=member.impaired_since,
    )  # fmt: skip


def price_member(sv: Any, run: Run, attempt: Attempt, member: Member, now: datetime) -> ledger.AttemptCost:
    """A member's cost from its start to its end (or now); recorded on it once it ended."""
    seen = as_attempt(member, attempt)
    window = ledger.attempt_window(seen, now)
    if window is None:
        return ledger.AttemptCost(0.0, None, None, None, "unknown")
    history = ledger.SpotHistory(sv.clients.ec2, *window) if member.ended_at else ledger.RecentSpotHistory(
        sv.clients.ec2, *window)  # fmt: skip
    try:
        cost = ledger.price_attempt(seen, run.spec, now, history)
    except ClientError as error:
        log.warning("no spot price history for %s of %s: %s", member.instance_id, run.run_id, error)
        cost = ledger.price_attempt(seen, run.spec, now, None)
    if member.ended_at:
        member.priced, member.cost_usd, member.on_demand_usd = True, cost.usd, cost.on_demand_usd
        member.hourly_usd, member.price_source = cost.hourly_usd, cost.source
    return cost


def sum_costs(costs: list[ledger.AttemptCost]) -> ledger.AttemptCost:
    """The members' costs as one attempt's: hours, dollars and the hourly rate added up."""

    def total(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return round(sum(known), 6) if known else None

    return ledger.AttemptCost(
        sum(c.hours for c in costs), total([c.usd for c in costs]), total([c.on_demand_usd for c in costs]),
        total([c.hourly_usd for c in costs]), " + ".join(sorted({c.source for c in costs})) or "unknown",
    )  # fmt: skip


def members_cost(attempt: Attempt, spec: Any, now: datetime, spot: Any) -> ledger.AttemptCost:
    """A gang attempt's cost for `status` and `cost`: recorded once it ended, else each member priced now."""
    if attempt.ended_at and attempt.priced:
        return ledger.recorded_or_priced(attempt, spec, now, spot)
    return sum_costs([
        ledger.AttemptCost(0.0, m.cost_usd, m.on_demand_usd, m.hourly_usd, m.price_source) if m.priced
        else ledger.price_attempt(as_attempt(m, attempt), spec, now, spot)
        for m in attempt.members
    ])  # fmt: skip


def price_gang(sv: Any, run: Run, attempt: Attempt, now: datetime) -> None:
    """An ended gang attempt's cost: the sum of its members' (replaced ones too), recorded on the attempt."""
    costs = [
        ledger.AttemptCost(0.0, m.cost_usd, m.on_demand_usd, m.hourly_usd, m.price_source) if m.priced
        else price_member(sv, run, attempt, m, now)
        for m in attempt.members
    ]  # fmt: skip
    ledger.record_price(attempt, sum_costs(costs))


def open_gang_cost(sv: Any, run: Run, attempt: Attempt, now: datetime) -> tuple[float, float]:
    """(USD the open gang attempt cost so far, USD per hour of its live members now): the dollar limits' view."""
    spent = hourly = 0.0
    for member in attempt.members:
        cost = (ledger.AttemptCost(0.0, member.cost_usd, None, None, "") if member.priced
                else price_member(sv, run, attempt, member, now))  # fmt: skip
        spent += cost.usd or 0.0
        if member.live:
            hourly += (cost.hourly_usd or 0.0) + ledger.volume_usd_per_hour(run.spec.volume_gb)
    return spent, hourly


def tag_stop(sv: Any, run: Run, attempt: Attempt, value: str) -> None:
    """The graceful stop for every live member (only instances of this run's attempt with the project's profile)."""
    live = [m for m in attempt.members if m.live]
    described = _describe(sv.clients, [m.instance_id for m in live])
    ours = [m.instance_id for m in live if sv.ours(described.get(m.instance_id), run.run_id, attempt.n)]
    if not ours:
        return
    try:
        sv.clients.ec2.create_tags(Resources=ours, Tags=[{"Key": sv.cfg.stop_tag, "Value": value}])
    except ClientError as error:
        log.warning("could not tag %s for a graceful stop: %s", ", ".join(ours), error)


def _terminate_members(sv: Any, run: Run, attempt: Attempt, members: list[Member]) -> None:
    described = _describe(sv.clients, [m.instance_id for m in members])
    ours = [m.instance_id for m in members if sv.ours(described.get(m.instance_id), run.run_id, attempt.n)]
    if ours:
        sv.clients.ec2.terminate_instances(InstanceIds=ours)


class GangWatcher:
    """One reconcile of a launched gang attempt: members lost, replacements, the whole gang's end."""

    def __init__(self, sv: Any) -> None:
        self.sv, self.cfg, self.clients = sv, sv.cfg, sv.clients

    def step(self, run: Run, attempt: Attempt, now: datetime) -> dict[str, Any]:
        sup = _sup()
        before = run.to_item()
        if not attempt.members:  # adopted by the single-node path (a stop during a launch): take the whole gang
            attempt.instance_id = ""
            if not adopt_members(self.clients, run, attempt, self.cfg, now, end_partial=True):
                attempt.end(AttemptEnd.RECLAIMED, "part of the gang was gone before it was recorded", iso(now))
                return self.sv._after(run, AttemptEnd.RECLAIMED, attempt.message, now)
        live = [m for m in attempt.members if m.live]
        described = _describe(self.clients, [m.instance_id for m in live])
        host = attempt.live_member(0)
        if host is not None and not host.private_ip:  # EC2 did not list the host at launch: tag the gang now
            for member in live:
                member.private_ip = (described.get(member.instance_id) or {}).get("PrivateIpAddress", "")
            _tag_nodes(self.clients, self.cfg, sorted(live, key=lambda m: m.node))
        lost: list[tuple[Member, AttemptEnd, str]] = []
        for member in live:
            instance = described.get(member.instance_id)
            state = (instance or {}).get("State", {}).get("Name", "gone")
            started = parse_iso(member.started_at) or now
            if instance is None and (now - started).total_seconds() < sup.JUST_LAUNCHED_SECONDS:
                continue
            if state in ("pending", "running"):
                continue
            if state in sup.STOPPED_STATES:
                _terminate_members(self.sv, run, attempt, [member])
            status = _node_status(self.clients, self.cfg, run, attempt, member.node)
            reason, words = sup.classify(instance, status, as_attempt(member, attempt))
            ended = parse_iso((status or {}).get("ended_at")) or now
            member.state, member.ended_at = MemberState.LOST, iso(ended)
            member.end_reason, member.message = reason, words
            if status:
                member.price_usd = ledger.number(status.get("hourly_price_usd"))
            price_member(self.sv, run, attempt, member, now)
            lost.append((member, reason, words))
        if run.state in (RunState.LAUNCHING, RunState.RECOVERING) and not lost and not attempt.gang_ending:
            run.state = RunState.RUNNING
        ending = attempt.gang_ending or (AttemptEnd.STOPPED if run.stop_requested_at else None)
        if not ending:
            ending = self._decide(run, attempt, lost, described, now)
        if ending:
            return self._end_gang(run, attempt, now)
        self._keep_limits(run, attempt, now)
        if run.to_item() != before:  # a quiet minute writes nothing
            self.sv.store.save(run)
        return {"run_id": run.run_id, "state": run.state, "instance": attempt.instance_id,
                "nodes": {m.node: m.instance_id for m in attempt.members if m.live}}  # fmt: skip

    def _decide(
        self, run: Run, attempt: Attempt, lost: list[tuple[Member, AttemptEnd, str]],
        described: Mapping[str, Any], now: datetime,
    ) -> AttemptEnd | None:  # fmt: skip
        """Replace lost non-hosts, or begin the whole gang's end: returns the gang's end reason once it began."""
        host_lost = host_reclaim(attempt, lost)
        for member, reason, words in lost:
            unjoined = self._unjoined_replacement(run, attempt, member) if reason in WAITING_ENDS else ""
            if unjoined:
                return self._begin_end(run, attempt, AttemptEnd.RECLAIMED,
                                       f"{unjoined} ended ({words}) before it joined the training: the whole gang "
                                       "relaunches", now)  # fmt: skip
            waiting = self._waiting_for(run, attempt, member, now) if reason in WAITING_ENDS else ""
            if waiting:
                return self._begin_end(run, attempt, AttemptEnd.RECLAIMED,
                                       f"node {member.node} ended ({words}) while {waiting}: the whole gang "
                                       "relaunches", now)  # fmt: skip
            if reason != AttemptEnd.RECLAIMED and host_lost and member.node != 0:
                # A survivor's torchrun cannot reach the store of a host that is going away: its trainer's failure
                # is the host's reclaim (a preemption), not an error of the run.
                return self._begin_end(run, attempt, AttemptEnd.RECLAIMED,
                                       f"node 0 (the rendezvous host) lost: {host_lost}; node {member.node} "
                                       f"ended with it ({words})", now)  # fmt: skip
            if reason != AttemptEnd.RECLAIMED:  # the trainer's own end on one node is the gang's (a stall too)
                return self._begin_end(run, attempt, reason, f"node {member.node}: {words}", now)
            if member.node == 0:
                return self._begin_end(run, attempt, AttemptEnd.RECLAIMED,
                                       f"node 0 (the rendezvous host) lost: {words}", now)  # fmt: skip
            self.sv._notify(run, f"attempt {attempt.n}: node {member.node} ({member.instance_id}) lost ({words}); "
                                 "launching a replacement")  # fmt: skip
        missing = [k for k in range(run.spec.nodes) if attempt.live_member(k) is None]
        if missing and not attempt.replace_since:
            attempt.replace_since = iso(now)
        since = parse_iso(attempt.replace_since)
        if since is None:
            return None
        waited = (now - since).total_seconds()
        for node in missing:
            if waited >= self.cfg.gang_replace_seconds:
                break
            try:
                member = launch_replacement(self.clients, run, attempt, self.cfg, node, now)
            except _sup().LaunchRefused as refused:
                return self._begin_end(run, attempt, AttemptEnd.RECLAIMED, f"node {node}: {refused}", now)
            if member is not None:
                for old in attempt.members_of(node):
                    if old.state == MemberState.LOST:
                        old.state = MemberState.REPLACED
                attempt.members.append(member)
                self.sv._notify(run, f"attempt {attempt.n}: node {node} replaced by {member.instance_id}")
        running = all(
            (m := attempt.live_member(k)) is not None
            and (described.get(m.instance_id) or {}).get("State", {}).get("Name") == "running"
            for k in range(run.spec.nodes)
        )
        if running:
            attempt.replace_since = ""
            return None
        if waited >= self.cfg.gang_replace_seconds:
            minutes = self.cfg.gang_replace_seconds / 60
            words = f"no replacement running within gang_replace_timeout ({minutes:g} min): the whole gang relaunches"
            return self._begin_end(run, attempt, AttemptEnd.RECLAIMED, words, now)
        return None

    def _waiting_for(self, run: Run, attempt: Attempt, survivor: Member, now: datetime) -> str:
        """Which lost node's replacement `survivor` was waiting for when it ended ('' when none): a non-host lost
        to a reclaim within the survivors' rendezvous window (gang_replace_seconds + the agent's pull and boot
        margin + the stop grace) whose replacement is not running yet, or has not reported training progress since
        it started (the gang has not met again)."""
        window = self.cfg.gang_replace_seconds + AGENT_JOIN_MARGIN_SECONDS + self.cfg.stop_timeout_seconds
        for gone in attempt.members:
            if gone.node in (0, survivor.node) or gone.state not in (MemberState.LOST, MemberState.REPLACED):
                continue
            ended = parse_iso(gone.ended_at)
            if gone.end_reason != AttemptEnd.RECLAIMED or ended is None or (now - ended).total_seconds() > window:
                continue
            replacement = attempt.live_member(gone.node)
            if replacement is None:
                return f"node {gone.node}'s replacement was not running yet"
            if not _progressed_since(self.clients, self.cfg, run, attempt, replacement):
                return f"node {gone.node}'s replacement ({replacement.instance_id}) had not joined the training yet"
        return ""

    def _unjoined_replacement(self, run: Run, attempt: Attempt, member: Member) -> str:
        """Names `member` when it is a replacement that ended on its own before it trained a step with the gang (its
        image pull timed out, its restore failed): no replacement came, so the whole gang relaunches as the next
        attempt, a preemption like the replacement timeout. Not the run's error: the gang's own nodes pulled and
        restored the same image and steps; a fault that persists fails every node of the next attempt at its start,
        with no replacement pending, and that is counted as the run's error. Bounded in time as `_waiting_for` is
        (a trainer without a heartbeat never shows it joined)."""
        if not any(m.node == member.node and m.state == MemberState.REPLACED for m in attempt.members):
            return ""
        started, ended = parse_iso(member.started_at), parse_iso(member.ended_at)
        window = self.cfg.gang_replace_seconds + AGENT_JOIN_MARGIN_SECONDS + self.cfg.stop_timeout_seconds
        if started is None or ended is None or (ended - started).total_seconds() > window:
            return ""
        if _progressed_since(self.clients, self.cfg, run, attempt, member):
            return ""
        return f"node {member.node}'s replacement ({member.instance_id})"

    def _begin_end(self, run: Run, attempt: Attempt, reason: AttemptEnd, words: str, now: datetime) -> AttemptEnd:
        """Stop every live member gracefully (the stop tag); a success needs no stop: the others end by themselves."""
        attempt.gang_ending, attempt.gang_ending_words = reason, words
        if reason != AttemptEnd.SUCCEEDED and not attempt.stop_tagged_at:
            tag_stop(self.sv, run, attempt, "gang")
            attempt.stop_tagged_at = iso(now)
        self.sv._notify(run, f"attempt {attempt.n}: {words}; stopping the whole gang")
        return reason

    def _end_gang(self, run: Run, attempt: Attempt, now: datetime) -> dict[str, Any]:
        sup = _sup()
        live = [m for m in attempt.members if m.live]
        if run.stop_requested_at and not attempt.stop_tagged_at:
            tag_stop(self.sv, run, attempt, run.stop_reason or "user")
            attempt.stop_tagged_at = iso(now)
        if live:
            since = parse_iso(attempt.stop_tagged_at or run.stop_requested_at) or now
            if (now - since).total_seconds() > self.cfg.stop_timeout_seconds and not attempt.terminated_at:
                _terminate_members(self.sv, run, attempt, live)
                attempt.terminated_at = iso(now)
            self.sv.store.save(run)
            return {"run_id": run.run_id, "state": run.state, "stopping": [m.instance_id for m in live]}
        reason = attempt.gang_ending or AttemptEnd.STOPPED
        words = attempt.gang_ending_words or "stopped on request"
        if run.stop_requested_at and not attempt.gang_ending:
            host = next((m for m in attempt.members if m.node == 0), None)
            reason, words = (host.end_reason or AttemptEnd.STOPPED, host.message) if host else (reason, words)
        for member in attempt.members:
            if member.state == MemberState.LOST:
                member.state = MemberState.ENDED
        attempt.end(reason, words, iso(now))
        price_gang(self.sv, run, attempt, now)
        if reason == AttemptEnd.RECLAIMED and attempt.zone:
            run.cooldown[sup.pool_key(attempt.instance_type, attempt.zone)] = iso(
                now + timedelta(seconds=self.cfg.cooldown_seconds)
            )
        return self.sv._after(run, reason, words, now)

    def _keep_limits(self, run: Run, attempt: Attempt, now: datetime) -> None:
        """The dollar limit over the sum of the members; the cloud-side health checks per member."""
        if not run.stop_requested_at and run.spec.max_cost_usd:
            self.sv._keep_within_limit(run, attempt, now)
        if run.stop_requested_at or attempt.unhealthy or attempt.gang_ending:
            return
        stalled = self.sv._progress_stalled(run, attempt, now)
        for member in (m for m in attempt.members if m.live):
            seen = as_attempt(member, attempt)
            why = self.sv._unhealthy(seen, now)
            member.impaired_since = seen.impaired_since
            if why and "status checks" in why:  # AWS's hardware: this member is lost, the next reconcile replaces it
                _terminate_members(self.sv, run, attempt, [member])
                member.reclaim_warned_at = member.reclaim_warned_at or iso(now)
                self.sv._notify(run, f"attempt {attempt.n}: node {member.node} is hung ({why}): terminated")
            elif why:
                stalled = stalled or f"node {member.node}: {why}"
        if stalled:  # one node stalled is the run stalled: every node waits on it in the collectives
            attempt.unhealthy = stalled
            _terminate_members(self.sv, run, attempt, [m for m in attempt.members if m.live])
            attempt.gang_ending, attempt.gang_ending_words = AttemptEnd.STALLED, f"the supervisor ended it: {stalled}"
            attempt.terminated_at = iso(now)
            self.sv._notify(run, f"attempt {attempt.n} is hung ({stalled}): every node terminated")


def host_reclaim(attempt: Attempt, lost: list[tuple[Member, AttemptEnd, str]]) -> str:
    """Why node 0 is being reclaimed (its spot notice, or its loss as reclaimed in this look), else ''."""
    for member, reason, words in lost:
        if member.node == 0 and reason == AttemptEnd.RECLAIMED:
            return words
    host = next((m for m in attempt.members if m.node == 0), None)
    if host is not None and host.reclaim_warned_at:
        return f"spot interruption notice at {host.reclaim_warned_at}"
    return ""


def mark_member(attempt: Attempt, instance_id: str, key: str, when: str) -> bool:
    """An event about one member (a spot warning): noted on that member; False if already noted or not a member."""
    member = next((m for m in attempt.members if m.instance_id == instance_id), None)
    if member is None or not hasattr(member, key) or getattr(member, key):
        return False
    setattr(member, key, when)
    return True
