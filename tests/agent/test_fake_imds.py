"""The fake IMDS speaks enough IMDSv2 for the agent and the demo to be honest about it."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from training_infra.local.imds import TOKEN_HEADER, TTL_HEADER, FakeImds


def call(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def imds():
    with FakeImds(
        instance_id="i-0abc",
        instance_type="g6.xlarge",
        availability_zone="us-west-2b",
        region="us-west-2",
        market="on-demand",
        tags={"training-infra:run-id": "r1", "Name": "trainer"},
    ) as server:
        yield server


def token(imds: FakeImds) -> dict[str, str]:
    status, value = call(f"{imds.url}/latest/api/token", "PUT", {TTL_HEADER: "60"})
    assert status == 200
    return {TOKEN_HEADER: value}


def test_metadata_requires_a_session_token(imds):
    assert call(f"{imds.url}/latest/meta-data/instance-id")[0] == 401
    assert call(f"{imds.url}/latest/meta-data/instance-id", headers={TOKEN_HEADER: "forged"})[0] == 401
    assert call(f"{imds.url}/latest/api/token", "PUT")[0] == 400, "the TTL header is mandatory"
    assert call(f"{imds.url}/latest/meta-data/instance-id", headers=token(imds)) == (200, "i-0abc")


def test_identity_placement_market_and_tags_are_served(imds):
    headers = token(imds)
    base = f"{imds.url}/latest"
    assert call(f"{base}/meta-data/instance-type", headers=headers)[1] == "g6.xlarge"
    assert call(f"{base}/meta-data/placement/availability-zone", headers=headers)[1] == "us-west-2b"
    assert call(f"{base}/meta-data/placement/region", headers=headers)[1] == "us-west-2"
    assert call(f"{base}/meta-data/instance-life-cycle", headers=headers)[1] == "on-demand"
    assert call(f"{base}/meta-data/tags/instance", headers=headers)[1].splitlines() == ["training-infra:run-id", "Name"]
    assert call(f"{base}/meta-data/tags/instance/training-infra:run-id", headers=headers)[1] == "r1"
    assert call(f"{base}/meta-data/tags/instance/missing", headers=headers)[0] == 404
    document = json.loads(call(f"{base}/dynamic/instance-identity/document", headers=headers)[1])
    assert (document["instanceId"], document["region"], document["availabilityZone"]) == (
        "i-0abc",
        "us-west-2",
        "us-west-2b",
    )


def test_a_tag_set_or_removed_while_running_is_served_at_the_next_request():
    with FakeImds(tags={"training-infra:attempt": "2"}) as imds:
        headers = token(imds)
        stop_url = f"{imds.url}/latest/meta-data/tags/instance/training-infra:stop"
        assert call(stop_url, headers=headers)[0] == 404
        imds.set_tag("training-infra:stop", "budget")
        assert call(stop_url, headers=headers) == (200, "budget")
        keys = call(f"{imds.url}/latest/meta-data/tags/instance", headers=headers)[1].splitlines()
        assert keys == ["training-infra:attempt", "training-infra:stop"]
        imds.remove_tag("training-infra:stop")
        assert call(stop_url, headers=headers)[0] == 404


def test_tags_from_a_function_are_read_at_every_request_and_its_failure_is_a_500():
    source = {"training-infra:deadline": "2026-11-29T18:00:00Z"}

    def read_tags() -> dict[str, str]:
        if "broken" in source:
            raise ConnectionError("the local AWS is down")
        return source

    with FakeImds(tags=read_tags) as imds:
        headers = token(imds)
        url = f"{imds.url}/latest/meta-data/tags/instance/training-infra:deadline"
        assert call(url, headers=headers) == (200, "2026-11-29T18:00:00Z")
        source["training-infra:deadline"] = "2026-11-30T06:00:00Z"
        assert call(url, headers=headers) == (200, "2026-11-30T06:00:00Z")
        source["broken"] = "yes"
        assert call(url, headers=headers)[0] == 500
        with pytest.raises(RuntimeError, match="reads its tags from a function"):
            imds.set_tag("training-infra:stop", "user")


def test_notices_are_404_until_injected_then_match_the_aws_format():
    with FakeImds() as imds:
        headers = token(imds)
        action_url = f"{imds.url}/latest/meta-data/spot/instance-action"
        rebalance_url = f"{imds.url}/latest/meta-data/events/recommendations/rebalance"
        assert call(action_url, headers=headers)[0] == 404
        assert call(rebalance_url, headers=headers)[0] == 404
        imds.inject_rebalance()
        assert "noticeTime" in json.loads(call(rebalance_url, headers=headers)[1])
        imds.inject_spot_interruption("stop")
        status, body = call(action_url, headers=headers)
        assert status == 200 and json.loads(body)["action"] == "stop" and json.loads(body)["time"].endswith("Z")
        imds.clear_notices()
        assert call(action_url, headers=headers)[0] == 404
        assert [r.status for r in imds.requests_for("spot/instance-action")] == [404, 200, 404]


def test_requests_are_recorded_safely_from_many_threads():
    with FakeImds() as imds:
        headers = token(imds)
        threads = [
            threading.Thread(target=call, args=(f"{imds.url}/latest/meta-data/instance-id", "GET", headers))
            for _ in range(20)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(imds.requests_for("instance-id")) == 20


def test_bad_arguments_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match="market='reserved' is not allowed"):
        FakeImds(market="reserved")
    with FakeImds() as imds, pytest.raises(ValueError, match="action='reboot' is not allowed"):
        imds.inject_spot_interruption("reboot")


def test_two_instances_each_answer_with_their_own_identity_address_and_endpoint():
    """Multi-node runs need N played instances at once, each with its own IMDS and private address."""
    with (
        FakeImds(instance_id="i-0one", private_ip="10.42.0.4") as one,
        FakeImds(instance_id="i-0two", private_ip="10.42.0.5") as two,
    ):
        assert one.url != two.url
        answers = {
            server.instance_id: (
                call(f"{server.url}/latest/meta-data/local-ipv4", headers=token(server))[1],
                json.loads(call(f"{server.url}/latest/dynamic/instance-identity/document", headers=token(server))[1]),
            )
            for server in (one, two)
        }
    assert answers["i-0one"][0] == "10.42.0.4" and answers["i-0one"][1]["privateIp"] == "10.42.0.4"
    assert answers["i-0two"][0] == "10.42.0.5" and answers["i-0two"][1]["instanceId"] == "i-0two"
