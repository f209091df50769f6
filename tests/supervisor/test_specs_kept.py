"""The run spec a run was launched with is kept with it (runtime/specs.py): in the record and runs/<id>/spec.yaml."""

from __future__ import annotations

import pytest

from tests.supervisor.test_records import TODAY, _item, _plain
from training_infra.supervisor.runtime import specs
from training_infra.supervisor.runtime.records import Run
from training_infra.supervisor.runtime.run_requests import LaunchRequest, Refused

SPEC = "run_id: bert\nimage: v3\nsecrets:\n  TOKEN: ssm:/training-infra/t\n"
EVENT = {"action": "launch", "run_id": "bert", "market": "spot", "instance_types": ["g5.xlarge"]}


def test_a_record_keeps_its_spec_yaml_through_the_store_format():
    run = Run.from_item(_item({**TODAY, "spec_yaml": SPEC}))
    assert run.spec_yaml == SPEC and not run.problem
    assert _plain(run.to_item())["spec_yaml"] == SPEC


def test_a_record_from_before_specs_were_kept_reads_and_writes_as_it_was():
    run = Run.from_item(_item(TODAY))
    assert run.spec_yaml == "" and not run.problem
    assert "spec_yaml" not in _plain(run.to_item()), "the item format of older runs is unchanged"


def test_a_launch_request_carries_the_spec_text():
    assert LaunchRequest.from_event({**EVENT, "spec_yaml": SPEC}).spec_yaml == SPEC
    assert LaunchRequest.from_event(EVENT).spec_yaml == "", "a CLI from before specs sends none"


@pytest.mark.parametrize("value", ["x" * (specs.MAX_SPEC_BYTES + 1), {"image": "v3"}])
def test_a_spec_that_is_not_text_of_at_most_16_kb_is_refused_as_a_usage_error(value):
    with pytest.raises(Refused) as refused:
        LaunchRequest.from_event({**EVENT, "spec_yaml": value})
    assert refused.value.usage and "request field 'spec_yaml': got " in str(refused.value)
    assert f"allowed: text of at most {specs.MAX_SPEC_BYTES} bytes" in str(refused.value)


class _FailingS3:
    """A denied PutObject, which the local AWS (no IAM enforcement) cannot give."""

    def put_object(self, **_kwargs):
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")


def test_a_failed_spec_write_is_logged_and_never_fails_the_launch(caplog):
    assert specs.keep(_FailingS3(), "outputs", "runs/", "bert", SPEC) is False
    assert "could not write runs/bert/spec.yaml" in caplog.text
    assert specs.keep(_FailingS3(), "outputs", "runs/", "bert", "") is False, "no spec: nothing written, no call"
    assert "runs/bert/spec.yaml" in caplog.text and caplog.text.count("could not write") == 1
