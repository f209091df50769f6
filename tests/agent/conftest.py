"""Fixtures that run the real agent (bash, AWS CLI) against moto and a fake IMDS on loopback.

One moto server per test module; each run is built by `agent_harness.new_run` (also used by
scripts/bench_agent.py) with its own resources, fakes and recording proxy. Tests run with faster
timings than production so each scenario takes seconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_harness import AgentRun, new_run

from training_infra.local.containers import ContainerEngine, unavailable_reason
from training_infra.local.emulator import Emulator

TEST_TIMINGS = {
    "max_runtime_seconds": 600,
    "idle_seconds": 600,
    "checkpoint_sync_seconds": 60,
    "spot_poll_seconds": 1,
    "stop_grace_seconds": 10,
    "extra_env": "EPOCHS=6\nSTEP_SECONDS=0.3",
}
# Retries without backoff: no test here proves the pause (1, 2, 4 s at base 1: 7 s per operation that fails for
# good, e.g. each refused final checkpoint sync); they prove the bounded count and what fails, which stay.
TEST_ENV = {"TI_RETRY_BASE_SECONDS": "0", "TI_LOG_SHIP_SECONDS": "5"}


@pytest.fixture(scope="module")
def aws(tmp_path_factory) -> Iterator[Emulator]:
    with Emulator(tmp_path_factory.mktemp("moto")) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def container_engine(tmp_path_factory) -> Iterator[ContainerEngine]:
    """podman + a registry playing ECR + the busybox trainer image, for the whole session.

    Skipped with one line where the engine cannot run (no root, packages missing); with CI=true
    that is a failure: CI runs as root and `make test` installs the engine first.
    """
    reason = unavailable_reason()
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the container engine is missing: {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)
    engine = ContainerEngine(tmp_path_factory.mktemp("container-engine")).start()
    yield engine
    engine.stop()


@pytest.fixture
def make_run(aws: Emulator, tmp_path: Path) -> Iterator[Callable[..., AgentRun]]:
    """`make_run(**AgentConfig overrides, env={...}, tags={...}, fail_s3_every=N, with_image=True, with_data=True)`."""
    runs: list[AgentRun] = []

    def make(*, env: dict[str, str] | None = None, **overrides) -> AgentRun:
        run = new_run(
            aws, tmp_path / f"run{len(runs)}", env={**TEST_ENV, **(env or {})}, **{**TEST_TIMINGS, **overrides}
        )
        runs.append(run)
        return run

    yield make
    for run in reversed(runs):
        run.close()
