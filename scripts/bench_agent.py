"""Benchmark: how fast the real agent reacts to a spot interruption notice, and what the container costs.

Runs the rendered user data under bash against a local moto server and a fake IMDS, set up by the
agent tests' harness (tests/agent/agent_harness.py), with production timings (5 s spot poll, 60 s
grace, checkpoints synced every 300 s, so only the notice path can save the checkpoint).

Process runtime, the example trainer at its default pace: each round injects a notice at a random
moment and prints, from the notice:
  * SIGTERM  - when the trainer's handler ran (its own log line);
  * ckpt S3  - when the checkpoint written on SIGTERM was readable in S3;
  * logs S3  - when runs/<id>/attempts/1/logs/training.log in S3 contained the SIGTERM line;
  * status   - when status.json (outcome interrupted) was in S3;
  * poweroff - when the power-off command ran.
AWS gives 120 s.

Container (docker) runtime on the local engine (podman, the local registry as ECR;
training_infra/local/containers.py; skipped with one line where it cannot run), the busybox
trainer, the image already in the engine's store (the agent's pull checks the registry but
transfers no layer). A `docker` wrapper stamps each call, so each round prints the container
path's own steps and overhead:
  * login     - `docker login` (the password from `aws ecr get-login-password` is not counted:
                the process runtime makes an AWS CLI call there too);
  * pull      - `docker pull` with every layer present;
  * run       - `docker run` to the trainer's first line inside the container;
  * overhead  - their sum (target < 2 s);
  * agent     - for scale: agent start to the trainer's first line (mostly AWS CLI calls);
  * SIGTERM   - spot notice to the trainer's SIGTERM handler inside the container (target <= 6 s).
Usage: python scripts/bench_agent.py [--rounds 3] [--skip-process|--skip-container]. Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "agent")]

from agent_harness import new_run  # noqa: E402 - the agent tests' harness: same fakes, same setup
from bench_size import SMOKE, size  # noqa: E402 - scripts/ is on the path when a script runs

from training_infra.local.containers import ContainerEngine, unavailable_reason  # noqa: E402
from training_infra.local.emulator import Emulator  # noqa: E402


def wait_until(check, timeout: float = 150.0, every: float = 0.1) -> float:
    """Poll `check()` until truthy; return the time.time() it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.time()
        time.sleep(every)
    raise TimeoutError("condition not reached")


def one_round(aws: Emulator, workdir: Path, number: int) -> dict[str, float]:
    run_id = f"bench-{number}"
    # Production timings (AgentConfig defaults); only the trainer runs "forever".
    run = new_run(aws, workdir / run_id, run_id=run_id, extra_env="EPOCHS=100000")
    s3, bucket = run.s3, run.config.outputs_bucket
    try:
        run.start()
        run.wait_for_log(r"epoch 3/", timeout=120)
        time.sleep(0 if SMOKE else random.uniform(0, 5))  # noqa: S311 - land anywhere in the 5 s poll cycle
        noticed = time.time()
        run.imds.inject_spot_interruption()
        found: dict[str, re.Match | None] = {}

        def trainer_saved() -> bool:
            text = run.training_log
            found["sigterm"] = re.search(r"received SIGTERM at ([0-9.]+)", text)
            found["ckpt"] = re.search(r"checkpoint (ckpt-\d+\.npz) \(on SIGTERM\)", text)
            return bool(found["sigterm"] and found["ckpt"])

        wait_until(trainer_saved, every=0.05)
        ckpt_key = f"checkpoints/{run_id}/{found['ckpt'].group(1)}"

        def exists(key: str, needle: str = "") -> bool:
            try:
                body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode(errors="replace")
            except s3.exceptions.NoSuchKey:
                return False
            return needle in body

        figures = {
            "SIGTERM": float(found["sigterm"].group(1)) - noticed,
            "ckpt S3": wait_until(lambda: exists(ckpt_key)) - noticed,
            "logs S3": wait_until(lambda: exists(f"runs/{run_id}/attempts/1/logs/training.log", "received SIGTERM"))
            - noticed,
            "status": wait_until(lambda: exists(f"runs/{run_id}/status.json", '"interrupted"')) - noticed,
        }
        wait_until(lambda: run.called("poweroff"))
        figures["poweroff"] = next(at for at, call in run.calls if call.startswith("poweroff")) - noticed
        run.wait(timeout=60)
        return figures
    finally:
        run.close()


TRAINER_STARTED = r"\[trainer\] started at ([0-9.]+)"

# Prints a line and beats once a second, then sleeps: a trainer whose own CPU is left out of the figure.
QUIET_TRAINER = (
    "import json, os, sys, time\n"
    "print('[trainer] started at %.3f' % time.time(), flush=True)\n"
    "for step in range(1, 100000):\n"
    "    open(os.environ['HEARTBEAT_FILE'] + '.tmp', 'w').write(json.dumps({'step': step}))\n"
    "    os.replace(os.environ['HEARTBEAT_FILE'] + '.tmp', os.environ['HEARTBEAT_FILE'])\n"
    "    print('step', step, flush=True)\n"
    "    time.sleep(1)\n"
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Today's figures, to print beside each new one: the bash agent (agent.sh, 5 s IMDS poll, a python3 and
# an AWS CLI process every few seconds), measured with this script on 2026-12-04 (2 shared cores, load
# average 3-6): 12 notices; start and CPU over 3 rounds of 60 s.
BEFORE = {
    "notice median": 1.65,
    "notice p95": 4.91,
    "start": 5.2,
    "cpu %": 13.6,
}


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on


def agent_cpu_seconds(agent_pid: int, trainer_marker: str) -> float:
    """CPU of the agent's process tree (its own, its live descendants' and every child they reaped),
    leaving out the trainer's process group (found by `trainer_marker` in its command line)."""
    parents, groups, cpu = {}, {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            pid = int(entry.name)
            parents[pid], groups[pid] = int(fields[1]), int(fields[2])
            cpu[pid] = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    trainer_groups = set()
    for pid in cpu:
        with contextlib.suppress(OSError):
            if trainer_marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                trainer_groups.add(groups[pid])
    total = 0
    for pid in cpu:
        ancestor = pid
        while ancestor not in (agent_pid, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == agent_pid and groups[pid] not in trainer_groups:
            total += cpu[pid]
    return total / CLOCK_TICKS


# Logs its SIGTERM with the time, then exits: one notice, one short run.
SIGTERM_TRAINER = (
    "import signal, sys, time\n"
    "def stop(*_):\n"
    "    print('received SIGTERM at %.3f' % time.time(), flush=True); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "print('[trainer] started at %.3f' % time.time(), flush=True)\n"
    "while True: time.sleep(0.1)\n"
)


def notice_round(aws: Emulator, workdir: Path, number: int) -> float:
    """Production timings, a trainer that only waits: seconds from the spot notice to its SIGTERM handler."""
    workdir.mkdir(parents=True)
    trainer = workdir / "sigterm-trainer.py"
    trainer.write_text(SIGTERM_TRAINER)
    run = new_run(aws, workdir / "run", run_id=f"bench-notice-{number}", training_command=f"{sys.executable} {trainer}")
    try:
        run.start().wait_for_log(TRAINER_STARTED, timeout=180)
        time.sleep(0 if SMOKE else random.uniform(1, 6))  # noqa: S311 - land anywhere in a poll cycle
        noticed = time.time()
        run.imds.inject_spot_interruption()
        return float(run.wait_for_log(r"received SIGTERM at ([0-9.]+)", timeout=60).group(1)) - noticed
    finally:
        run.close()


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def cpu_round(aws: Emulator, workdir: Path, number: int, seconds: float) -> dict[str, float]:
    """Production timings, a trainer that logs and beats each second: the agent's start (user data to the
    trainer's first line) and its own CPU over `seconds` while the trainer runs (percent of one core)."""
    workdir.mkdir(parents=True)
    trainer = workdir / "cpu-bench-trainer.py"
    trainer.write_text(QUIET_TRAINER)
    run = new_run(aws, workdir / "run", run_id=f"bench-cpu-{number}", training_command=f"{sys.executable} {trainer}")
    try:
        run.start()
        started = float(run.wait_for_log(TRAINER_STARTED, timeout=180).group(1))
        time.sleep(1 if SMOKE else 15)  # past the first minute's one-off calls of each watcher
        assert run.process is not None
        before, at = agent_cpu_seconds(run.process.pid, trainer.name), time.monotonic()
        time.sleep(seconds)
        used = agent_cpu_seconds(run.process.pid, trainer.name) - before
        return {"start": started - run.started_at, "cpu %": 100 * used / (time.monotonic() - at)}
    finally:
        run.close()


TIMING_DOCKER = """#!/bin/bash
# bench only: stamps each docker call, then runs the engine's docker script
printf '%s %s\\n' "$1" "$(date +%s.%N)" >>{trace}
[[ $1 != run ]] || exec {docker} "$@"
{docker} "$@"
rc=$?
printf '%s-end %s\\n' "$1" "$(date +%s.%N)" >>{trace}
exit $rc
"""


def container_round(aws: Emulator, engine: ContainerEngine, workdir: Path, number: int) -> dict[str, float]:
    """One docker run of the busybox trainer, its docker calls stamped; a spot notice ends it."""
    run = new_run(
        aws, workdir / f"docker-{number}", run_id=f"bench-docker-{number}", engine=engine, extra_env="EPOCHS=100000"
    )
    trace = run.tmp / "docker-trace"
    wrapper = run.tmp / "bin" / "docker-timed"
    wrapper.write_text(TIMING_DOCKER.format(trace=trace, docker=engine.docker))
    wrapper.chmod(0o755)
    run.env["TI_DOCKER"] = str(wrapper)
    try:
        engine.podman("pull", "--quiet", f"{run.config.image_uri}:{run.config.image_tag}")  # no layer transfer
        trainer_at = float(run.start().wait_for_log(TRAINER_STARTED, timeout=180).group(1))
        stamps = {verb: float(at) for verb, at in (line.split() for line in trace.read_text().splitlines())}
        figures = {
            "login": stamps["login-end"] - stamps["login"],
            "pull": stamps["pull-end"] - stamps["pull"],
            "run": trainer_at - stamps["run"],
        }
        figures["overhead"] = sum(figures.values())
        figures["agent"] = trainer_at - run.started_at
        run.wait_for_log(r"epoch 2/", timeout=60)
        time.sleep(0 if SMOKE else random.uniform(0, 5))  # noqa: S311 - land anywhere in the 5 s poll cycle
        noticed = time.time()
        run.imds.inject_spot_interruption()
        figures["SIGTERM"] = float(run.wait_for_log(r"received SIGTERM at ([0-9.]+)", timeout=60).group(1)) - noticed
        run.wait(timeout=180)
    finally:
        run.close()
    return figures


def report(title: str, rounds: list[dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'':10}{'min':>7}{'median':>8}{'max':>7}")
    for name in rounds[0]:
        values = [r[name] for r in rounds]
        print(f"{name:10}{min(values):7.1f}{statistics.median(values):8.1f}{max(values):7.1f}")


def print_round(number: int, figures: dict[str, float]) -> None:
    print(f"round {number + 1}: " + "  ".join(f"{name} {value:5.1f}s" for name, value in figures.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="notices to inject (one agent run each)")
    parser.add_argument("--skip-process", action="store_true", help="only the container runtime's figures")
    parser.add_argument("--skip-container", action="store_true", help="only the process runtime's figures")
    parser.add_argument("--cpu-seconds", type=float, default=60, help="how long to measure the agent's CPU")
    parser.add_argument("--notices", type=int, default=12, help="spot notices for the SIGTERM p95 (one short run each)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} is not allowed: use 1 or more")
    args.rounds, args.notices = size(args.rounds), size(args.notices)
    args.cpu_seconds = size(int(args.cpu_seconds), 2)
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp, Emulator(Path(tmp) / "moto") as aws:
        if not args.skip_process and args.notices:
            print(f"spot notice to the trainer's SIGTERM: {args.notices} short runs, production timings", flush=True)
            latencies = [notice_round(aws, Path(tmp) / f"notice-{n}", n) for n in range(args.notices)]
            print("  " + " ".join(f"{value:.2f}" for value in latencies))
            print(
                f"notice to SIGTERM: median {statistics.median(latencies):.2f} s, p95 {p95(latencies):.2f} s, "
                f"max {max(latencies):.2f} s (target p95 <= 2 s; agent.sh: median {BEFORE['notice median']} s, "
                f"p95 {BEFORE['notice p95']} s)",
                flush=True,
            )
        if not args.skip_process:
            print("agent start and CPU (process runtime, production timings, a trainer beating each second)")
            rounds = []
            for number in range(args.rounds):
                rounds.append(cpu_round(aws, Path(tmp) / f"cpu-{number}", number, args.cpu_seconds))
                print_round(number, rounds[-1])
            report("start: user data to the trainer's first line (s); cpu %: the agent's own, of one core", rounds)
            print(
                f"median start {statistics.median(r['start'] for r in rounds):.1f} s (agent.sh: {BEFORE['start']} s), "
                f"CPU {statistics.median(r['cpu %'] for r in rounds):.1f} % of one core (agent.sh: {BEFORE['cpu %']} %;"
                " target <= 1 %)",
                flush=True,
            )
            print("process runtime, example trainer, production timings", flush=True)
            rounds = []
            for number in range(args.rounds):
                rounds.append(one_round(aws, Path(tmp), number))
                print_round(number, rounds[-1])
            report("seconds after the spot notice (AWS reclaims the instance at 120 s)", rounds)
        reason = unavailable_reason()
        if args.skip_container:
            return
        if reason:
            print(f"\ncontainer runtime: skipped ({reason})")
            return
        print("\ncontainer runtime (podman, local registry as ECR), busybox trainer", flush=True)
        with ContainerEngine(Path(tmp) / "engine") as engine:
            rounds = []
            for number in range(args.rounds):
                rounds.append(container_round(aws, engine, Path(tmp), number))
                print_round(number, rounds[-1])
        report("seconds: the container path's own steps (overhead target < 2 s); notice to SIGTERM (<= 6 s)", rounds)


if __name__ == "__main__":
    main()
