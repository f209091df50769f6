"""The replacement's agent waits for the replaced attempt's final status before it restores, within a bound."""

from __future__ import annotations

import pytest

from training_infra.compute.agent.ti_agent import handover
from training_infra.compute.agent.ti_agent.imds import ImdsError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_restore_waits_until_the_old_attempts_final_status_is_in_s3():
    clock = Clock()
    final_at = 37.0  # the old box's finalize uploads its status.json 37 s into the wait
    found = handover.wait_for_replaced(3, lambda _n: clock.now >= final_at, clock=clock, sleep=clock.sleep)
    assert found.final_status_seen and found.replaced == 3
    assert final_at <= found.waited_seconds < final_at + handover.POLL_SECONDS
    assert "attempt 3's final status.json is in S3" in found.words()


def test_without_a_final_status_the_wait_ends_when_the_old_box_must_be_gone():
    clock = Clock()
    found = handover.wait_for_replaced(1, lambda _n: False, clock=clock, sleep=clock.sleep)
    assert not found.final_status_seen and found.waited_seconds == handover.WAIT_SECONDS
    assert handover.WAIT_SECONDS > 120, "longer than the two-minute notice: the old trainer has stopped"
    assert "its box is gone" in found.words()


def test_a_failing_look_counts_as_not_yet_and_the_bound_still_holds():
    clock = Clock()

    def broken(_n: int) -> bool:
        raise OSError("S3 unreachable")

    found = handover.wait_for_replaced(1, broken, wait_seconds=30, clock=clock, sleep=clock.sleep)
    assert not found.final_status_seen and found.waited_seconds == 30


@pytest.mark.parametrize(
    ("tag", "attempt", "replaced"),
    [
        ("1", 2, (1,)), ("4", 9, (4,)), ("2", 2, ()), ("3", 2, ()), ("0", 2, ()), ("x", 2, ()), (None, 2, ()),
        ("", 2, ()), ("1,2", 3, (1, 2)), ("2,1,9", 3, (1, 2)), ("1,x", 3, (1,)),
    ],
)  # fmt: skip
def test_only_earlier_attempts_named_by_the_tag_are_waited_for(tag, attempt, replaced):
    assert handover.replaced_attempts(tag, attempt) == replaced


class FakeAgent:
    """What before_restore reads of the agent: its tag, attempt, run id, bucket, S3 client and log."""

    def __init__(self, tag: str | None, listed_after: int) -> None:
        self._tag, self.attempt, self.run_id, self.outputs_bucket = tag, 2, "bert", "outputs"
        self.run_prefix = "s3://outputs/runs/bert"  # a URL: not the key prefix to list
        self.calls: list[dict] = []
        self.lines: list[str] = []
        self.listed_after = listed_after
        self.aws = self

    def tag(self, name: str) -> str | None:  # as Agent.tag: None for IMDS's 404 (no such tag)
        assert name in ("replaces", "replaces-until")
        return None if name == "replaces-until" else self._tag

    def client(self, service: str):
        assert service == "s3"
        return self

    def list_objects_v2(self, **request):
        self.calls.append(request)
        return {"KeyCount": 1 if len(self.calls) > self.listed_after else 0}

    def log(self, line: str) -> None:
        self.lines.append(line)


def test_before_restore_lists_the_replaced_attempts_status_key(monkeypatch):
    monkeypatch.setattr(handover.time, "sleep", lambda _s: None)
    agent = FakeAgent("1", listed_after=2)
    found = handover.before_restore(agent)
    assert found is not None and found.final_status_seen
    assert agent.calls[-1] == {"Bucket": "outputs", "Prefix": "runs/bert/attempts/1/status.json", "MaxKeys": 1}
    assert len(agent.calls) == 3 and agent.lines[0].startswith("replacement of attempt 1 (spot notice)")


def test_an_attempt_that_replaces_nothing_restores_at_once():
    agent = FakeAgent(None, listed_after=0)
    assert handover.before_restore(agent) is None and agent.calls == [] and agent.lines == []


def test_the_wait_is_bounded_by_the_old_boxs_end_from_the_tag_never_longer_than_the_default():
    from datetime import UTC, datetime

    now = datetime(2026, 11, 29, 8, 1, tzinfo=UTC).timestamp()
    assert handover.wait_bound("2026-11-29T08:02:30Z", now) == 90
    assert handover.wait_bound("2026-11-29T08:00:30Z", now) == 0, "booted after the old box ended: no wait"
    assert handover.wait_bound("2026-11-29T09:00:00Z", now) == handover.WAIT_SECONDS
    assert handover.wait_bound(None, now) == handover.WAIT_SECONDS
    assert handover.wait_bound("not a time", now) == handover.WAIT_SECONDS


# --- IMDS errors fail closed: only a 404 is "no tag" (issue 28's review, finding 2) ----------------------------


def test_a_404_is_no_tag_at_once_and_other_imds_errors_are_asked_again_with_backoff():
    sleeps: list[float] = []
    assert handover.read_tag(lambda: None, sleep=sleeps.append) is None and sleeps == [], "404: no tag, no retry"
    answers = iter([ImdsError("HTTP 500"), ImdsError("timed out"), "1"])

    def flaky() -> str | None:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert handover.read_tag(flaky, sleep=sleeps.append) == "1" and sleeps == [1.0, 2.0]


def test_imds_that_stays_down_raises_after_its_bounded_retries():
    sleeps: list[float] = []
    calls = []

    def down() -> str | None:
        calls.append(1)
        raise ImdsError("HTTP 503")

    with pytest.raises(ImdsError):
        handover.read_tag(down, sleep=sleeps.append)
    assert len(calls) == handover.IMDS_TRIES and sleeps == [1.0, 2.0, 4.0]


class ImdsAgent(FakeAgent):
    """FakeAgent whose tags come from a real IMDSv2 client against the fake IMDS (training_infra/local/imds.py)."""

    def __init__(self, imds_url: str) -> None:
        super().__init__(None, listed_after=0)
        from training_infra.compute.agent.ti_agent.imds import Imds

        self.imds = Imds(imds_url)

    def tag(self, name: str) -> str | None:
        return self.imds.get(f"meta-data/tags/instance/training-infra:{name}")


def failing_tags(failures: int, tags: dict[str, str]):
    """A tag source for FakeImds that fails `failures` times (IMDS answers HTTP 500), then answers `tags`."""
    left = [failures]

    def source() -> dict[str, str]:
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError("tag service down")
        return tags

    return source


def test_a_replaces_tag_behind_a_passing_imds_error_is_still_waited_for():
    from training_infra.local.imds import FakeImds

    clock = Clock()
    tags = {"training-infra:replaces": "1", "training-infra:attempt": "2"}
    with FakeImds(tags=failing_tags(2, tags)) as imds:
        agent = ImdsAgent(imds.url)
        agent.listed_after = 1
        found = handover.before_restore(agent, sleep=clock.sleep)
    assert found is not None and found.replaced == 1 and found.final_status_seen, "IMDS's 500s were asked again"
    assert agent.calls[0]["Prefix"] == "runs/bert/attempts/1/status.json"


def test_imds_down_for_good_waits_the_whole_bound_before_restoring_instead_of_restoring_at_once():
    from training_infra.local.imds import FakeImds

    clock = Clock()
    with FakeImds(tags=failing_tags(10**6, {})) as imds:
        agent = ImdsAgent(imds.url)
        found = handover.before_restore(agent, sleep=clock.sleep)
    assert found is not None and found.unread and not found.final_status_seen
    assert clock.now >= handover.WAIT_SECONDS, "the whole bound: a box this one may replace has stopped saving by then"
    assert "HTTP 500" in found.unread and "instance tags not readable" in agent.lines[-1]
    assert agent.calls == [], "nothing to poll: which attempt it replaces is unknown"


def test_an_agent_whose_tags_stay_unreadable_for_the_handover_bound_ends_before_any_trainer_starts(
    tmp_path, monkeypatch
):
    from training_infra.compute.agent.ti_agent.agent import Agent
    from training_infra.compute.agent.ti_agent.checkpoints import AttemptFailed
    from training_infra.local.imds import FakeImds

    pauses: list[float] = []
    monkeypatch.setattr(handover.time, "sleep", pauses.append)
    with FakeImds(tags=failing_tags(10**6, {})) as imds:
        agent = Agent({"TI_ROOT": str(tmp_path), "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url})
        with pytest.raises(AttemptFailed, match=r"instance tags not readable from IMDS for 180 s \(.*HTTP 500.*\): "
                           "attempt unknown, so no trainer starts"):  # fmt: skip
            agent.read_tags()
        asked = len(imds.requests_for("meta-data/tags/instance"))
    assert sum(pauses) >= handover.WAIT_SECONDS and asked == len(pauses) + 1, "asked again for the whole bound"
    assert max(pauses) <= 30, "never more than 30 s between two tries"
    assert agent.attempt == 0 and agent.trainer is None, "no trainer, and no attempt's records overwritten"


def test_the_attempt_tag_read_after_a_minute_of_imds_errors_is_still_the_right_attempt(tmp_path, monkeypatch):
    from training_infra.compute.agent.ti_agent.agent import Agent
    from training_infra.local.imds import FakeImds

    pauses: list[float] = []
    monkeypatch.setattr(handover.time, "sleep", pauses.append)
    with FakeImds(tags=failing_tags(6, {"training-infra:attempt": "3"})) as imds:
        agent = Agent({"TI_ROOT": str(tmp_path), "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url})
        agent.read_tags()
    assert sum(pauses) > 7, "longer than the 4 tries (about 7 s) that made it attempt 0"
    assert agent.attempt == 3 and agent.tags_unread == ""


def test_an_agent_whose_tags_read_after_a_passing_error_knows_its_attempt(tmp_path, monkeypatch):
    from training_infra.compute.agent.ti_agent.agent import Agent
    from training_infra.local.imds import FakeImds

    monkeypatch.setattr(handover, "IMDS_BACKOFF_SECONDS", 0.0)
    with FakeImds(tags=failing_tags(1, {"training-infra:attempt": "3"})) as imds:
        agent = Agent({"TI_ROOT": str(tmp_path), "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url})
        agent.read_tags()
    assert agent.attempt == 3 and agent.tags_unread == ""


def test_the_restore_waits_for_every_attempt_still_saving_not_only_the_latest():
    """Two notices in one window: attempt 2's status.json (it ended early, never trained) does not end the wait
    while attempt 1's box still saves; the wait ends when attempt 1's arrives too."""
    clock = Clock()
    arrives = {2: 0.0, 1: 61.0}
    found = handover.wait_for_replaced((1, 2), lambda n: clock.now >= arrives[n], wait_seconds=150, clock=clock,
                                       sleep=clock.sleep)  # fmt: skip
    assert found.final_status_seen and found.attempts == (1, 2) and found.replaced == 2
    assert 61 <= found.waited_seconds < 61 + handover.POLL_SECONDS


def test_when_one_of_several_attempts_never_reports_the_wait_runs_to_the_bound_and_names_it():
    clock = Clock()
    found = handover.wait_for_replaced((1, 2), lambda n: n == 2, wait_seconds=150, clock=clock, sleep=clock.sleep)
    assert not found.final_status_seen and found.missing == (1,) and found.waited_seconds == 150
    assert "no final status.json from attempt 1 after 150 s" in found.words()
