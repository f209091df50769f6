"""The local AWS to work in, end to end: `make local`, the verbs by hand against it, `make demo`,
`make demo-spot` (both on that one sandbox, as a user with `local env` in effect) and
`make demo-container` (its own sandbox on podman, beside those two), then Ctrl-C. One sandbox for
all but the container demo, whose waits overlap the others', keeps this module to about five minutes."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training_infra.local.containers import unavailable_reason
from training_infra.local.demo import OWNER_MARK
from training_infra.local.instance import aws_client
from training_infra.local.sandbox import SandboxState, process_identity, wait_ready

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "examples" / "trainer" / "train.py"


def _clean_env() -> dict[str, str]:
    """The caller's environment without any AWS or sandbox setting: what a new shell has."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TRAINING_INFRA_", "CDK_"))}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """`make local` in the background, as a user runs it in a second terminal; Ctrl-C at the end."""
    folder = tmp_path_factory.mktemp("local") / "sandbox"
    log = folder.parent / "make-local.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            ["make", "-s", "local", f"LOCAL_FLAGS=--dir {folder}"],
            cwd=ROOT, env=_clean_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        state = wait_ready(folder, process, timeout=300)
        exports = subprocess.run(
            [sys.executable, "-m", "training_infra", "local", "env", "--dir", str(folder)],
            env=_clean_env(), capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        env = {**_clean_env(), **_parse_exports(exports), "COLUMNS": "160"}
        yield {"folder": folder, "state": state, "env": env, "log": log, "process": process, "exports": exports}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
            process.wait(timeout=120)


def _parse_exports(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        found[name] = shlex.split(value)[0] if value else ""
    return found


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "training_infra", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert not check or result.returncode == 0, f"training-infra {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def _start_make(target: str, env: dict[str, str], *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["make", "-s", target, f"DEMO_FLAGS={' '.join(flags)}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish_make(process: subprocess.Popen[str]) -> str:
    try:
        stdout, stderr = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, stdout[-3000:] + stderr[-2000:]
    return stdout


# ---------------------------------------------------------------------------------------------- make local


def test_make_local_is_ready_with_stacks_image_and_declared_state_and_local_env_points_a_shell_at_it(sandbox):
    env, exports = sandbox["env"], sandbox["exports"]
    assert f"export AWS_ENDPOINT_URL={sandbox['state'].endpoint}" in exports
    assert f"export TRAINING_INFRA_LOCAL={sandbox['folder']}" in exports
    outputs_bucket = cli(env, "outputs", "outputs_bucket").stdout.strip()
    s3 = aws_client("s3", sandbox["state"].env)
    assert s3.get_bucket_versioning(Bucket=outputs_bucket)["Status"] == "Enabled", "declared in the template"
    log = sandbox["log"].read_text()
    assert "applied what moto's CloudFormation skipped: versioning x3" in log
    assert re.search(r"^match: \d+ resources of \d+ kinds hold what the stacks declare \(literal", log, re.MULTILINE)
    images = aws_client("ecr", sandbox["state"].env).describe_images(repositoryName="training-infra")["imageDetails"]
    assert ["latest"] in [i.get("imageTags") for i in images]


def test_a_second_make_local_on_the_same_folder_refuses_in_one_line(sandbox):
    result = cli(_clean_env(), "local", "up", "--dir", str(sandbox["folder"]), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: a local AWS is already running in {sandbox['folder']} (pid {sandbox['state'].pid}): "
        "`training-infra local down` first, or `--dir` for another"
    ]
    assert SandboxState.read(sandbox["folder"]).pid == sandbox["state"].pid, "the running one's folder is untouched"


@pytest.fixture(scope="module")
def by_hand(sandbox):
    """Two runs at once by hand: one stopped with `stop`, one left to succeed (`make demo-spot` below
    sends the spot notice with `local interrupt`)."""
    env = sandbox["env"]
    cli(env, "upload", str(ROOT / "examples" / "data"))
    dry = cli(env, "launch", "--run-id", "hand-stop", "--dry-run", "--command", f"python3 {TRAINER}")
    common = ["--max-runtime-hours", "1", "--command", f"python3 {TRAINER}", "--env", "STEP_SECONDS=0.5"]
    started = time.monotonic()
    cli(env, "launch", "-q", "--run-id", "hand-stop", *common, "--env", "EPOCHS=400")
    cli(env, "launch", "-q", "--run-id", "hand-done", *common, "--env", "EPOCHS=4")
    # As a user watching its log would: stop once the trainer is at work.
    logs = sandbox["folder"] / "instances"
    while time.monotonic() - started < 90 and not any(
        "[trainer] epoch" in p.read_text() and "run hand-stop" in p.read_text()
        for p in logs.glob("i-*/fs/var/log/training.log")
    ):
        time.sleep(0.2)
    missing = cli(env, "local", "interrupt", "no-such-run", check=False)
    stopped = cli(env, "stop", "hand-stop")
    follow_stop = cli(env, "logs", "hand-stop", "-f")
    follow_done = cli(env, "logs", "hand-done", "-f")
    status = {run: json.loads(cli(env, "status", run, "-o", "json").stdout) for run in ("hand-stop", "hand-done")}
    return {
        "dry": dry, "missing": missing, "stopped": stopped, "follow_stop": follow_stop, "follow_done": follow_done,
        "status": {run: found[0] if isinstance(found, list) else found for run, found in status.items()},
        "log": sandbox["log"].read_text(),
    }  # fmt: skip


def test_launch_dry_run_prints_the_plan_and_each_real_launch_plays_exactly_one_instance(by_hand):
    assert "would launch attempt 1" in by_hand["dry"].stdout
    played = re.findall(r"\(run (hand-[a-z]+), attempt (\d+),", by_hand["log"])
    assert sorted(played) == [("hand-done", "1"), ("hand-stop", "1")]


def test_stop_by_hand_ends_the_run_stopped_and_logs_follow_ends_with_it(by_hand):
    assert by_hand["stopped"].stdout.startswith("stopping run hand-stop on i-")
    assert "outcome=stopped" in by_hand["follow_stop"].stdout
    assert by_hand["status"]["hand-stop"]["state"] == "stopped"


def test_a_run_left_alone_succeeds_its_events_reach_the_supervisor_and_logs_follow_ends(by_hand):
    assert "outcome=succeeded" in by_hand["follow_done"].stdout
    assert by_hand["status"]["hand-done"]["state"] == "succeeded"
    assert re.search(
        r"supervisor <- EC2 Instance State-change Notification \S+ terminated: .*hand-done", by_hand["log"]
    )


def test_local_interrupt_of_a_run_without_a_live_instance_is_one_line(by_hand):
    assert by_hand["missing"].returncode == 1
    [line] = by_hand["missing"].stderr.strip().splitlines()
    assert re.fullmatch(
        r"error: run no-such-run has no live instance here \(the sandbox plays instances of .*hand-stop\)", line
    )


def test_make_deploy_with_local_env_in_effect_deploys_to_the_sandbox(sandbox, demos):
    result = demos["deploy"]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "TrainingInfra-Compute" in result.stdout + result.stderr
    stacks = aws_client("cloudformation", sandbox["state"].env).describe_stacks()["Stacks"]
    assert {s["StackStatus"] for s in stacks} <= {"CREATE_COMPLETE", "UPDATE_COMPLETE"}


# ---------------------------------------------------------------------------------------------- the demos


@pytest.fixture(scope="module")
def demos(sandbox, by_hand, tmp_path_factory):
    """`make deploy`, then `make demo` and `make demo-spot` at once, with `local env` in effect (all on the running
    sandbox), while `make demo-container` runs beside them with its own sandbox on podman: their waits overlap."""
    found, container, started = {}, None, {}
    reason = unavailable_reason()
    if not reason:
        workdir = tmp_path_factory.mktemp("demo-container")
        found["demo-container"] = {"dir": workdir}
        container = subprocess.Popen(
            ["make", "-s", "demo-container", f"DEMO_FLAGS=--workdir {workdir}"], cwd=ROOT, env=_clean_env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        found["deploy"] = subprocess.run(
            ["make", "-s", "deploy", "REQUIRE_APPROVAL=never", f"CDK_OUT={tmp_path_factory.mktemp('deploy')}"],
            cwd=ROOT, env=sandbox["env"], capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        # Both at once, as two users of one sandbox would: their runs overlap, so do their waits. A demo's run id
        # is the second it claimed its workdir in: the second demo starts a second after the first one's claim.
        for target, flags in (("demo", ()), ("demo-spot", ("--epochs", "60"))):
            workdir = tmp_path_factory.mktemp(target)
            started[target] = (_start_make(target, sandbox["env"], "--workdir", str(workdir), *flags), workdir)
            deadline = time.monotonic() + 120
            while not (workdir / OWNER_MARK).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.1)
        for target, (process, workdir) in started.items():
            found[target] = {"console": _finish_make(process), "dir": workdir}
    finally:
        for process, _ in started.values():
            if process.poll() is None:  # the other demo failed: this one is not waited for
                process.kill()
        if container is not None:
            output, _ = container.communicate(timeout=900)
            found["demo-container"].update(console=output, returncode=container.returncode)
    found["container-unavailable"] = reason
    return found


def _run_id(console: str) -> str:
    return re.search(r"Launch run (demo-\S+):", console)[1]


def test_make_demo_runs_on_the_sandbox_in_effect_and_fetches_the_outputs(demos, sandbox):
    console = demos["demo"]["console"]
    assert f"Use the local AWS already running (pid {sandbox['state'].pid}" in console
    assert "outcome=succeeded" in console
    run_id = _run_id(console)
    fetched = demos["demo"]["dir"] / "outputs" / run_id
    assert (fetched / "outputs" / "model.npz").stat().st_size > 0
    assert json.loads((fetched / "status.json").read_text())["outcome"] == "succeeded"
    assert "Stop the local AWS" not in console, "a sandbox the demo did not start stays up"


def test_make_demo_spot_resumes_attempt_2_from_the_last_checkpoint_attempt_1_wrote(demos):
    console = demos["demo-spot"]["console"]
    run_id = _run_id(console)
    assert console.count(f"launch --run-id {run_id}") == 1, "one launch by the user; the supervisor relaunched"
    attempts = demos["demo-spot"]["dir"] / "outputs" / run_id / "attempts"
    first = (attempts / "1" / "logs" / "training.log").read_text()
    second = (attempts / "2" / "logs" / "training.log").read_text()
    written = re.findall(r"\[trainer\] checkpoint (\S+)", first)
    [resumed] = re.findall(r"resumed from checkpoint (\S+)", second)
    assert written and resumed == written[-1], f"attempt 1 wrote {written}, attempt 2 resumed from {resumed}"
    status = json.loads((attempts / "1" / "status.json").read_text())
    assert status["outcome"] == "interrupted"
    assert "reclaimed: spot interruption notice" in console


def test_watch_once_at_80_columns_of_the_real_spot_run_draws_the_loss_curve_and_the_preemption(demos, sandbox):
    """Issue 27's test on a real run: `make demo-spot`'s run (the example trainer's heartbeats through the real
    agent into metrics.jsonl, `local interrupt` at its first checkpoint, attempt 2 to the end), drawn by `watch`."""
    run_id = _run_id(demos["demo-spot"]["console"])

    result = cli({**sandbox["env"], "COLUMNS": "80"}, "watch", run_id, "--once")

    text = result.stdout
    print(text)  # pytest -s: a person looks at it
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    assert re.match(rf"run {run_id}: succeeded, step \d+", lines[0]), lines[0]
    assert "1 preemption(s)" in " ".join(lines[:2])
    # The loss chart (the example trainer beats {"step": N, "loss": L}) holds a drawn curve, not an empty frame.
    titles = [n for n, line in enumerate(lines) if re.fullmatch(r" +\S[^│]*\S +", line)]
    start = next(n for n in titles if lines[n].strip() == "loss")
    end = next((n for n in titles if n > start), len(lines))
    assert any(len(re.findall(r"[▖▗▘▙▚▛▜▝▞▟▀▄▌▐█]", line)) >= 10 for line in lines[start:end]), lines[start:end]
    # The reclaim after attempt 1's start, attempt 2 after it too (the supervisor may start it on the notice,
    # before attempt 1 has ended), and the reclaim drawn with its x.
    found = re.search(
        r"attempt 1 at ([\d.]+) min, preempted at ([\d.]+) min, attempt 2 at ([\d.]+) min", " ".join(lines)
    )
    assert found and float(found[1]) < min(float(found[2]), float(found[3])), found
    assert any(re.search(r"x", line) for line in lines[start:end]), "the reclaim is marked on the loss chart"


def test_every_demo_step_heading_is_followed_by_what_the_step_did(demos):
    for found in [found for name, found in demos.items() if name.startswith("demo") and "console" in found]:
        steps = _steps(found["console"])
        assert [n for n, (heading, _) in enumerate(steps, 1) if not heading.startswith(f"{n}. ")] == []
        assert [heading for heading, lines in steps if not lines] == []


def _steps(console: str) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = []
    for line in console.splitlines():
        if re.match(r"^\d+\. ", line):
            steps.append((line, []))
        elif steps and line.strip():
            steps[-1][1].append(line)
    return steps


def test_make_demo_container_runs_the_example_image_on_podman_and_leaves_nothing(demos):
    reason = demos["container-unavailable"]
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the container engine is missing: {reason}", pytrace=False)
        pytest.skip(reason)
    found = demos["demo-container"]
    console, workdir = found["console"], found["dir"]
    assert found["returncode"] == 0, console[-3000:]
    assert "podman build examples/trainer" in console
    assert "starting trainer (docker runtime" in console
    assert "outcome=succeeded" in console
    run_id = _run_id(console)
    assert (workdir / "outputs" / run_id / "outputs" / "model.npz").stat().st_size > 0
    assert not (workdir / "sandbox").exists(), "local down removed the sandbox's folder"
    left = subprocess.run(["pgrep", "-f", str(workdir / "sandbox")], capture_output=True, text=True).stdout
    assert left == "", f"processes of the demo's sandbox left: {left}"


# ---------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_on_make_local_stops_everything_and_removes_its_folder(sandbox, demos):
    """Last in the module: it ends the shared sandbox."""
    process, folder = sandbox["process"], sandbox["folder"]
    moto_pid = int((folder / "emulator" / "moto.pid").read_text())
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=120)
    assert not folder.exists()
    assert not Path(f"/proc/{moto_pid}").exists(), "the moto server is gone"
    assert SandboxState.read(folder) is None
    left = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True).stdout
    assert left == ""
    assert "local AWS stopped" in sandbox["log"].read_text()
    down = cli(_clean_env(), "local", "down", "--dir", str(folder))
    assert down.stdout == f"no local AWS was running in {folder}; nothing to stop\n"
    env = cli(_clean_env(), "local", "env", "--dir", str(folder), check=False)
    assert (env.returncode, env.stdout) == (1, "")
    assert env.stderr.strip() == f"error: no local AWS is running in {folder}: start one with `make local`"


# ---------------------------------------------------------------------------------------------- no sandbox needed


def test_local_up_refuses_a_folder_that_is_not_a_sandbox_and_leaves_its_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = cli(_clean_env(), "local", "up", "--dir", str(tmp_path), check=False)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.strip() == (
        f"error: --dir {tmp_path}: exists and is not a local AWS's folder (no state.json); "
        "give a new or empty folder (`local down` removes it)"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("phase", "alive", "expected"),
    [
        ("starting", True, "is still starting (deploying the stacks); try again shortly"),
        ("stopping", True, "is stopping"),
        ("ready", False, "is gone: `make local` starts a new one"),
    ],
)
def test_local_env_says_in_one_line_why_a_sandbox_cannot_be_used(tmp_path, phase, alive, expected):
    dead = subprocess.Popen(["true"])
    dead.wait()
    SandboxState(
        pid=os.getpid() if alive else dead.pid, endpoint="http://localhost:1", region="us-east-1",
        runtime="process", schedule_seconds=60, phase=phase, started_at="2026-12-04T20:00:00+00:00",
        identity=process_identity(os.getpid()) if alive else "",
    ).write(tmp_path)  # fmt: skip
    result = cli(_clean_env(), "local", "env", "--dir", str(tmp_path), check=False)
    assert (result.returncode, result.stdout) == (1, "")
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: the local AWS in {tmp_path}") and line.endswith(expected)
