"""The agent's production path, `docker` runtime, on a real container engine, end to end.

podman (behind a `docker` script that execs it) runs the trainer image that a local registry
serves as the account's ECR registry (training_infra/local/containers.py); the agent logs in with
the password moto's ECR returns, pulls, runs the container with its production flags and mounts,
stops it with `docker stop -t GRACE`. Each test is one way a run ends, and each checks that no
container is left behind.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from agent_harness import HUNG_TRAINER, HUNG_TRAINER_COMMAND, diagnostic_sections, hung_trainer_stack

from training_infra.local.containers import free_loopback_address

pytestmark = pytest.mark.slow

LONG_TRAINING = "EPOCHS=400\nSTEP_SECONDS=0.2\nCHECKPOINT_EVERY=5"


@pytest.fixture
def make_container_run(make_run, container_engine):
    def make(**kwargs):
        return make_run(engine=container_engine, **kwargs)

    return make


def seconds_between(earlier: str, later: str) -> int:
    """Seconds from one HH:MM:SS log stamp to a later one (same day)."""
    hours, minutes, seconds = (int(b) - int(a) for a, b in zip(earlier.split(":"), later.split(":"), strict=True))
    return hours * 3600 + minutes * 60 + seconds


def assert_no_container_left(run) -> None:
    assert run.engine.containers() == [], "the trainer's container is removed whatever the outcome"


def test_container_run_logs_in_to_ecr_pulls_and_runs_the_image_with_the_contract_mounts_and_env(make_container_run):
    run = make_container_run(run_id="ctr-happy", extra_env="EPOCHS=5\nSTEP_SECONDS=0.2\nCHECKPOINT_EVERY=2").run()

    status = run.status()
    assert (status["outcome"], status["exit_code"]) == ("succeeded", 0), run.setup_log
    assert "starting trainer (docker runtime" in run.setup_log
    logins = json.loads((run.tmp / ".docker" / "config.json").read_text())["auths"]
    assert run.engine.registry_host in logins, "the agent logged in to ECR with `aws ecr get-login-password`"
    assert f"{run.config.image_uri}:v1" in run.engine.images(), "the agent pulled the image"
    metrics = json.loads(run.read("runs/ctr-happy/outputs/metrics.json"))
    assert metrics["run_id"] == "ctr-happy", "RUN_ID reaches the container"
    assert metrics["epochs_completed"] == 5, "TI_EXTRA_ENV reaches the container"
    assert metrics["data_read_only"] is True and metrics["data_rows"] == 161, "/data is the synced data, read-only"
    assert run.keys("checkpoints/ctr-happy/") == [
        "checkpoints/ctr-happy/_manifest.json",
        *(f"checkpoints/ctr-happy/ckpt-00000{n}.txt" for n in (2, 4, 5)),
    ]
    assert "runs/ctr-happy/_SUCCESS" in run.keys("runs/ctr-happy/")
    assert re.search(r"\[trainer\] started at [0-9.]+ as pid \d+ \(0:0\)", run.read(run.log_key("training.log")))
    assert run.called("poweroff")
    assert_no_container_left(run)


def test_container_spot_notice_sigterms_the_trainer_inside_within_6s_and_the_grace_lets_it_flush(make_container_run):
    # A compound command as docs/agent.md asks for it: `exec` makes the trainer the init's child.
    run = make_container_run(
        run_id="ctr-spot",
        training_command="cd /app && exec ./train.sh",
        extra_env=f"{LONG_TRAINING}\nFLUSH_SECONDS=3",
    ).start()
    run.wait_for_log(r"epoch 3/")
    noticed_at = time.time()
    run.imds.inject_spot_interruption()
    run.wait(90)

    log = run.read(run.log_key("training.log"))
    assert "has no exec" not in log
    sigterm_at = float(re.search(r"received SIGTERM at ([0-9.]+)", log).group(1))
    assert sigterm_at - noticed_at <= 6, "SIGTERM reaches the trainer inside the container within one poll"
    saved = re.search(r"checkpoint (ckpt-\d+\.txt) \(on SIGTERM\)", log)
    assert saved, "the trainer was not killed during its 3 s flush: the grace period (10 s) held"
    assert f"checkpoints/ctr-spot/{saved.group(1)}" in run.keys("checkpoints/ctr-spot/"), "flushed checkpoint in S3"
    status = run.status()
    assert (status["outcome"], status["exit_code"]) == ("interrupted", 143)
    assert json.loads(run.read("runs/ctr-spot/outputs/metrics.json"))["interrupted"] is True
    assert run.called("poweroff")
    assert_no_container_left(run)


def test_container_trainer_crash_puts_its_exit_code_in_status_json(make_container_run):
    run = make_container_run(
        run_id="ctr-crash",
        training_command="cd /app && ./train.sh; exit $?",  # the shell passes the trainer's exit code on
        extra_env="EPOCHS=6\nSTEP_SECONDS=0.2\nFAIL_AT_EPOCH=2",
    ).run()

    status = run.status()
    assert (status["outcome"], status["exit_code"]) == ("failed", 3)
    log = run.read(run.log_key("training.log"))
    assert "simulated crash" in log
    assert "WARNING: TI_TRAINING_COMMAND has no exec: on SIGTERM its shell exits" in log, "measured: it would"
    assert "runs/ctr-crash/_SUCCESS" not in run.keys("runs/ctr-crash/")
    assert run.called("poweroff")
    assert_no_container_left(run)


def test_container_trainer_that_stalls_and_ignores_sigterm_is_killed_after_the_grace_period(make_container_run):
    run = make_container_run(
        run_id="ctr-hung",
        stop_grace_seconds=3,
        stall_seconds=3,
        extra_env="EPOCHS=400\nSTEP_SECONDS=0.2\nHANG_AT_EPOCH=4",
    ).run()

    status = run.status()
    assert status["outcome"] == "stalled" and "no progress" in status["message"], run.setup_log
    assert status["exit_code"] == 137, "killed (SIGKILL) after ignoring SIGTERM for the grace period"
    stopped = re.search(r"T(\d\d:\d\d:\d\d)Z \[agent\] SIGTERM to the trainer; 3s grace", run.setup_log)
    killed = re.search(
        r"T(\d\d:\d\d:\d\d)Z \[agent\] trainer ignored SIGTERM for the grace period: killed", run.setup_log
    )
    assert stopped and killed, run.setup_log
    waited = seconds_between(stopped.group(1), killed.group(1))
    assert 2 <= waited <= 6, f"the kill came after the 3 s grace, not before and not much later ({waited} s)"
    beats = run.root / "opt/training-infra/state/progress/heartbeat.json"
    assert beats.exists(), "the busybox trainer touched HEARTBEAT_FILE through the progress mount"
    assert run.called("poweroff")
    assert_no_container_left(run)


def test_container_max_runtime_deadline_stops_the_container_and_saves_its_outputs(make_container_run):
    run = make_container_run(run_id="ctr-deadline", max_runtime_seconds=20, extra_env=LONG_TRAINING).run()

    status = run.status()
    assert status["outcome"] == "deadline" and "max runtime" in status["message"]
    assert 20 <= status["duration_seconds"] <= 40
    assert json.loads(run.read("runs/ctr-deadline/outputs/metrics.json"))["interrupted"] is True
    assert run.keys("checkpoints/ctr-deadline/")
    assert run.called("poweroff")
    assert_no_container_left(run)


def test_container_image_missing_from_ecr_fails_clearly_uploads_logs_and_powers_off(make_container_run):
    run = make_container_run(run_id="ctr-no-image", with_image=False, env={"TI_RETRY_ATTEMPTS": "2"}).run()

    status = run.status()
    assert (status["outcome"], status["exit_code"]) == ("failed", None)
    assert (
        status["message"]
        == f"cold start: image failed: could not get image {run.config.image_uri}:v1 from ECR after 2 attempts"
    )
    setup_log = run.read(run.log_key("training-setup.log"))
    assert "manifest unknown" in setup_log, "the engine's own error is in the uploaded setup log"
    assert "starting trainer" not in setup_log
    assert run.called("poweroff")
    assert_no_container_left(run)


class StallingRegistry:
    """Answers as a registry to the login (`GET /v2/`), then never answers the pull: a stalled pull."""

    def __init__(self) -> None:
        self.address = free_loopback_address()
        self.pull_requests: list[str] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                if self.path == "/v2/":
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                outer.pull_requests.append(self.path)
                outer.release.wait(120)  # hold the connection without a byte, as a dead network path does

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer((self.address, 80), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_container_stalled_pull_is_cut_after_the_pull_timeout_and_retried_a_bounded_number_of_times(
    make_container_run,
):
    stalling = StallingRegistry()
    try:
        run = make_container_run(run_id="ctr-stall", env={"TI_RETRY_ATTEMPTS": "2", "TI_PULL_TIMEOUT_SECONDS": "3"})
        run.registry_address = stalling.address
        run.run(timeout=90)
    finally:
        stalling.stop()

    assert len(stalling.pull_requests) >= 2 and "/manifests/v1" in stalling.pull_requests[0], stalling.pull_requests
    assert run.setup_log.count("docker pull stalled: cut after 3s") == 2
    status = run.status()
    assert status["outcome"] == "failed" and "could not get image" in status["message"]
    assert "starting trainer" not in run.setup_log
    assert run.called("poweroff")
    assert_no_container_left(run)


@pytest.fixture(scope="module")
def example_trainer_image(container_engine) -> str:
    """examples/trainer/Dockerfile built by the engine (its Docker Hub base swapped for a local Debian one)."""
    return container_engine.build_example_trainer()


def test_container_stall_diagnostics_dump_the_python_stack_of_the_trainer_inside_by_its_host_pid(
    make_container_run, example_trainer_image
):
    # The example image has python3; its CMD is replaced by the hung trainer, synced in with /data.
    run = make_container_run(
        run_id="ctr-stack",
        with_image=False,
        stall_seconds=3,
        stop_grace_seconds=2,
        training_command=HUNG_TRAINER_COMMAND,
    )
    run.engine.push_trainer(run.config.image_uri.rsplit("/", 1)[1], "v1", image=example_trainer_image)
    run.s3.put_object(Bucket=run.config.data_bucket, Key="data/hung_trainer.py", Body=HUNG_TRAINER.encode())
    run.run()

    assert run.status()["outcome"] == "stalled", run.setup_log
    diagnostics = run.read(run.log_key("training-diagnostics.txt"))
    # Measured with the former `docker top CONTAINER -eo pid`: podman runs that ps inside the container,
    # "executable file not found" here (no ps in the image), else the container's own PIDs (1, 2, ...).
    assert "wait_for_allreduce (hung_trainer.py:" in hung_trainer_stack(diagnostics), diagnostics
    assert "step 1 done; entering allreduce" in diagnostic_sections(diagnostics)["the trainer's last 200 log lines"]
    assert_no_container_left(run)


def test_example_trainer_dockerfile_builds_here_and_its_image_trains_through_the_docker_path(
    make_container_run, example_trainer_image
):
    run = make_container_run(run_id="ctr-example", with_image=False, extra_env="EPOCHS=6\nSTEP_SECONDS=0.2")
    run.engine.push_trainer(run.config.image_uri.rsplit("/", 1)[1], "v1", image=example_trainer_image)
    run.run()

    status = run.status()
    assert (status["outcome"], status["exit_code"]) == ("succeeded", 0), run.training_log
    metrics = json.loads(run.read("runs/ctr-example/outputs/metrics.json"))
    assert (metrics["run_id"], metrics["epochs_completed"]) == ("ctr-example", 6), "the image's CMD ran train.py"
    assert metrics["final_loss"] < 0.05, "numpy in the image fitted the synced /data"
    assert "runs/ctr-example/outputs/model.npz" in run.keys("runs/ctr-example/")
    assert "epoch 6/6 loss" in run.read(run.log_key("training.log"))
    assert_no_container_left(run)
