"""End to end on the local AWS: what `make demo-spot` does, with assertions on S3 and the CLI's output."""

from __future__ import annotations

import json
import re

import pytest

from training_infra import naming
from training_infra.local.demo import Demo


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory):
    """One whole demo with a spot interruption: deploy, upload, launch, interrupt, resume, fetch, destroy compute."""
    capture = tmp_path_factory.mktemp("demo-console") / "console.txt"
    from training_infra.local import demo as demo_module

    demo = Demo(workdir=tmp_path_factory.mktemp("demo"), epochs=24, step_seconds=0.4, spot_interruption=True)
    with open(capture, "w") as sink:
        demo_module.console.file = sink
        try:
            fetched = demo.main()
            s3 = demo.client("s3")
            outputs_bucket, data_bucket = demo._output("outputs_bucket"), demo._output("training_bucket")
            keys = {
                "runs": demo._keys(outputs_bucket, f"{naming.RUNS_PREFIX}"),
                "checkpoints": demo._keys(outputs_bucket, f"{naming.CHECKPOINTS_PREFIX}{demo.run_id}/"),
                "data": demo._keys(data_bucket, naming.DATA_PREFIX),
            }
            status = json.loads(
                s3.get_object(Bucket=outputs_bucket, Key=f"runs/{demo.run_id}/status.json")["Body"].read()
            )
            attempt_status = {
                n: json.loads(
                    s3.get_object(Bucket=outputs_bucket, Key=f"runs/{demo.run_id}/attempts/{n}/status.json")[
                        "Body"
                    ].read()
                )
                for n in (1, 2)
            }
            record = demo._supervisor().store.get(demo.run_id)
            stacks = {s["StackName"] for s in demo.client("cloudformation").describe_stacks()["Stacks"]}
        finally:
            demo_module.console.file = None
            demo.emulator.stop()
    return {
        "demo": demo, "fetched": fetched, "keys": keys, "status": status, "attempt_status": attempt_status,
        "record": record, "stacks": stacks, "console": capture.read_text(),
    }  # fmt: skip


def test_resumed_run_succeeded_with_outputs_logs_and_success_marker_in_s3(finished_demo):
    run_id = finished_demo["demo"].run_id
    runs = set(finished_demo["keys"]["runs"])
    prefix = f"runs/{run_id}/"
    assert {
        f"{prefix}status.json",
        f"{prefix}_SUCCESS",
        f"{prefix}outputs/model.npz",
        f"{prefix}attempts/2/logs/training.log",
    } <= runs
    assert f"{naming.LATEST_PREFIX}_SUCCESS" in runs, "runs/latest/ mirrors the newest finished run"
    assert finished_demo["status"]["outcome"] == "succeeded"
    assert finished_demo["status"]["exit_code"] == 0


def test_spot_notice_flushed_checkpoints_and_the_second_launch_resumed_from_them(finished_demo):
    assert finished_demo["keys"]["checkpoints"], "checkpoints reached S3"
    console = finished_demo["console"]
    assert "outcome=interrupted" in console
    assert "received SIGTERM" in console
    assert "resumed from checkpoint" in console


def test_the_supervisor_not_the_user_relaunched_on_other_capacity_and_the_run_succeeded(finished_demo):
    record = finished_demo["record"]
    first, second = record.attempts
    assert record.state == "succeeded" and not record.active
    assert (first["end_reason"], second["end_reason"]) == ("reclaimed", "succeeded")
    assert (first["instance_type"], first["zone"]) != (second["instance_type"], second["zone"]), (
        "the reclaimed pool cooled down"
    )
    assert record.errors_used == 0, "a reclaim is not an error"
    console = finished_demo["console"]
    assert console.count(f"launch --run-id {finished_demo['demo'].run_id}") == 1, "one launch by the user"
    assert '"launched": "' + second["instance_id"] + '"' in console, "the supervisor's relaunch"


def test_each_attempt_keeps_its_own_record_in_s3(finished_demo):
    one, two = finished_demo["attempt_status"][1], finished_demo["attempt_status"][2]
    assert (one["outcome"], two["outcome"]) == ("interrupted", "succeeded")
    assert one["instance_id"] != two["instance_id"]
    prefix = f"runs/{finished_demo['demo'].run_id}/attempts/"
    assert {f"{prefix}1/status.json", f"{prefix}2/status.json"} <= set(finished_demo["keys"]["runs"])


def test_attempt_2_restored_exactly_the_last_checkpoint_attempt_1_wrote(finished_demo):
    plays = [lines for heading, lines in _steps(finished_demo["console"]) if "Play the instance" in heading]
    written = [
        re.search(r"\[trainer\] checkpoint (\S+)", line)[1]
        for line in plays[0]
        if re.search(r"\[trainer\] checkpoint \S+", line)
    ]
    [resumed] = [
        re.search(r"resumed from checkpoint (\S+)", line)[1] for line in plays[1] if "resumed from checkpoint" in line
    ]
    assert written and resumed == written[-1], f"attempt 1 wrote {written}, attempt 2 resumed from {resumed}"


def test_status_shows_the_two_attempts(finished_demo):
    console = finished_demo["console"]
    assert f"run {finished_demo['demo'].run_id}: succeeded" in console
    assert "reclaimed: spot interruption notice" in console, "attempt 1's row says AWS reclaimed it"


def test_cli_outputs_launch_status_cost_and_fetch_speak_to_the_user(finished_demo):
    console = finished_demo["console"]
    run_id = finished_demo["demo"].run_id
    for expected in (
        "training_bucket = ",
        "launch_template_id = ",
        f"launched run {run_id}: attempt 1 on ",
        "saving vs on-demand",
        "fetched ",
    ):
        assert expected in console
    fetched = finished_demo["fetched"]
    assert (fetched / "outputs" / "model.npz").stat().st_size > 0
    assert json.loads((fetched / "status.json").read_text())["run_id"] == run_id


def test_destroying_compute_keeps_every_other_stack_and_the_data(finished_demo):
    assert naming.COMPUTE_STACK not in finished_demo["stacks"]
    assert {naming.STORAGE_STACK, naming.REGISTRY_STACK, naming.SAFETY_STACK} <= finished_demo["stacks"]
    assert finished_demo["keys"]["data"], "the uploaded dataset is still there"


def _steps(console: str) -> list[tuple[str, list[str]]]:
    """The narration as (heading, lines under it), headings being `N. text`."""
    steps: list[tuple[str, list[str]]] = []
    for line in console.splitlines():
        if re.match(r"^\d+\. ", line):
            steps.append((line, []))
        elif steps and line.strip():
            steps[-1][1].append(line)
    return steps


def test_every_step_heading_is_followed_by_what_the_step_did(finished_demo):
    """Issue 14: step 7 ("Relaunch ...") was an empty heading followed at once by step 8."""
    steps = _steps(finished_demo["console"])
    assert [number for number, (heading, _) in enumerate(steps, 1) if not heading.startswith(f"{number}. ")] == []
    assert [heading for heading, lines in steps if not lines] == []


def test_waiting_on_the_instance_shows_the_training_log_as_it_grows_once(finished_demo):
    """Issue 14: the steps that wait on the instance sat silent for about 20 s."""
    plays = [lines for heading, lines in _steps(finished_demo["console"]) if "Play the instance" in heading]
    assert len(plays) == 2
    for lines in plays:
        shown = [line for line in lines if line.startswith("   │ ")]
        assert any("[trainer] epoch" in line for line in shown)
        assert len(shown) == len(set(shown)), "a log line is shown once"
        assert any(
            line.startswith("   the agent ended ") and line.endswith(" s later and powered the instance off")
            for line in lines
        )
    assert any("resumed from checkpoint" in line for line in plays[1])


def test_the_image_step_prints_nothing_the_command_above_it_did_not_print(finished_demo):
    """Issue 14: step 3 printed `training-infra:latest` under `training-infra outputs ecr_repository_uri`."""
    [(_, lines)] = [step for step in _steps(finished_demo["console"]) if "Push a training image" in step[0]]
    assert lines[0].strip().startswith("$ ") and lines[0].endswith("outputs ecr_repository_uri")
    assert lines[1:] == [
        "   ECR PutImage: a stand-in manifest tagged training-infra:latest "
        "(on AWS, the image workflow pushes the real one)"
    ]
