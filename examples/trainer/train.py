"""Example trainer that honours the training-infra container contract.

Fits a linear model to every CSV under DATA_DIR (columns ..., y) by gradient descent, one "epoch"
per STEP_SECONDS so a run takes a realistic while. What it shows, and what your trainer needs:
  * reads inputs from DATA_DIR (/data), writes results to OUTPUT_DIR (/outputs);
  * checkpoints to CHECKPOINT_DIR (/checkpoints) atomically (write *.tmp, then rename) every few
    epochs, and resumes from the newest checkpoint there, so a relaunched spot run continues;
  * on SIGTERM (spot notice, idle, deadline) saves a checkpoint and its outputs, then exits 143;
  * reports progress once per epoch by writing HEARTBEAT_FILE as JSON, {"step": N, "loss": L} (written
    beside and renamed, so the agent never reads half a beat): a run whose step stops changing for
    stall_minutes is stopped as stalled, so a hung loop is told from slow work.

Knobs (environment): EPOCHS (30), STEP_SECONDS (1.0), CHECKPOINT_EVERY (3 epochs),
KEEP_CHECKPOINTS (3), LEARNING_RATE (0.05); for tests: FAIL_AT_EPOCH (exit 3 there),
HANG_AT_EPOCH (stop making progress there, ignoring SIGTERM like a real hang).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{6})\.npz$")
stop_requested = threading.Event()


def setting(name: str, default: str) -> str:
    return os.environ.get(name, default)


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [trainer] {message}", flush=True)


def load_data(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(data_dir.rglob("*.csv"))
    if not files:
        raise SystemExit(f"no CSV files under DATA_DIR={data_dir}")
    table = np.vstack([np.loadtxt(f, delimiter=",", skiprows=1, ndmin=2) for f in files])
    return table[:, :-1], table[:, -1]


def newest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = sorted(p for p in checkpoint_dir.glob("ckpt-*.npz") if CHECKPOINT_NAME.match(p.name))
    return found[-1] if found else None


def save_checkpoint(checkpoint_dir: Path, epoch: int, weights: np.ndarray, keep: int) -> Path:
    """Write to a .tmp name and rename, so a sync never uploads half a checkpoint."""
    final = checkpoint_dir / f"ckpt-{epoch:06d}.npz"
    temporary = final.with_name(final.name + ".tmp")
    with open(temporary, "wb") as handle:
        np.savez(handle, weights=weights, epoch=epoch)
    os.replace(temporary, final)
    for old in sorted(checkpoint_dir.glob("ckpt-*.npz"))[:-keep]:
        old.unlink(missing_ok=True)
    return final


def save_outputs(output_dir: Path, weights: np.ndarray, metrics: dict) -> None:
    with open(output_dir / "model.npz", "wb") as handle:
        np.savez(handle, weights=weights)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def beat(path: Path, step: int, loss: float) -> None:
    """The progress contract: {"step": N} (other keys optional), replaced whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps({"step": step, "loss": loss}))
    partial.replace(path)


def main() -> int:
    data_dir = Path(setting("DATA_DIR", "/data"))
    output_dir = Path(setting("OUTPUT_DIR", "/outputs"))
    checkpoint_dir = Path(setting("CHECKPOINT_DIR", "/checkpoints"))
    heartbeat = setting("HEARTBEAT_FILE", "")
    epochs = int(setting("EPOCHS", "30"))
    step_seconds = float(setting("STEP_SECONDS", "1.0"))
    checkpoint_every = int(setting("CHECKPOINT_EVERY", "3"))
    keep = int(setting("KEEP_CHECKPOINTS", "3"))
    learning_rate = float(setting("LEARNING_RATE", "0.05"))
    fail_at = int(setting("FAIL_AT_EPOCH", "0"))
    hang_at = int(setting("HANG_AT_EPOCH", "0"))
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    def on_sigterm(signum: int, frame: object) -> None:
        log(f"received SIGTERM at {time.time():.3f}; saving a checkpoint and stopping")
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_sigterm)

    features, target = load_data(data_dir)
    inputs = np.hstack([features, np.ones((len(features), 1))])  # last weight is the bias
    weights = np.zeros(inputs.shape[1])
    start_epoch = 0
    resumed = newest_checkpoint(checkpoint_dir)
    if resumed is not None:
        with np.load(resumed) as state:
            weights, start_epoch = state["weights"], int(state["epoch"])
        log(f"resumed from checkpoint {resumed.name} (epoch {start_epoch})")
    log(f"run {setting('RUN_ID', '?')}: {len(target)} rows, epochs {start_epoch + 1}..{epochs}")

    loss = float("nan")
    epoch = start_epoch
    while epoch < epochs and not stop_requested.is_set():
        epoch += 1
        if epoch == hang_at:
            log(f"epoch {epoch}: simulating a hang (no progress, SIGTERM ignored)")
            while True:
                time.sleep(1)
        for _ in range(20):
            error = inputs @ weights - target
            weights = weights - learning_rate * 2 * inputs.T @ error / len(target)
        loss = float(np.mean((inputs @ weights - target) ** 2))
        log(f"epoch {epoch}/{epochs} loss {loss:.6f}")
        if heartbeat:
            beat(Path(heartbeat), epoch, loss)
        if epoch == fail_at:
            log(f"epoch {epoch}: simulated crash (FAIL_AT_EPOCH)")
            return 3
        if epoch % checkpoint_every == 0 or epoch == epochs:
            log(f"checkpoint {save_checkpoint(checkpoint_dir, epoch, weights, keep).name}")
        stop_requested.wait(step_seconds)

    interrupted = stop_requested.is_set() and epoch < epochs
    if interrupted:
        log(f"checkpoint {save_checkpoint(checkpoint_dir, epoch, weights, keep).name} (on SIGTERM)")
    metrics = {
        "run_id": setting("RUN_ID", ""),
        "epochs_completed": epoch,
        "epochs_planned": epochs,
        "resumed_from_epoch": start_epoch if resumed is not None else None,
        "final_loss": loss,
        "interrupted": interrupted,
        "weights": [round(float(w), 4) for w in weights],
    }
    save_outputs(output_dir, weights, metrics)
    log(f"outputs written to {output_dir} ({'interrupted' if interrupted else 'finished'})")
    return 143 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
