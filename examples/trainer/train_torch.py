"""Example PyTorch trainer for training-infra: one process, or DDP on one node or a gang of nodes.

The pattern to copy (docs/agent.md, "Multi-node runs"); the same file runs
  * alone: `python train_torch.py` (single node, one process);
  * under torchrun: the agent wraps `python train_torch.py ...` in torchrun on every node of a
    `--nodes N` run (c10d rendezvous on node 0), or your own `torchrun ... train_torch.py` command.

What it shows, and what your trainer needs:
  * DDP over gloo (CPU) or NCCL (GPU), initialised from the environment torchrun sets;
  * checkpoints with `torch.distributed.checkpoint` (DCP) every CHECKPOINT_EVERY steps into
    CHECKPOINT_DIR/step-<N>/: every rank writes its shards there, rank 0 DCP's `.metadata`; then each
    node writes its marker `.node-<TI_NODE_RANK>.done` (the agent uploads the node's shards, then the
    marker). A step is complete when `.metadata` and all TI_NODES markers are there;
  * resumes from the newest step that is complete on EVERY node (the ranks agree on it; the agent
    restores the newest complete step before the start and pulls the other nodes' shards of new ones);
  * on SIGTERM (spot notice, stop, deadline) every rank learns it at the next step (one all-reduce of
    a flag), they save together and exit: 143 where the signal came, 75 elsewhere, so torchrun on a
    surviving node restarts its workers into the next rendezvous (a replacement node joins there);
  * writes HEARTBEAT_FILE as JSON, {"step": N, "loss": L, "metrics": {...}}, from each node's first
    worker (the agent of that node reads it), written beside and renamed.

Knobs (environment): STEPS (60), STEP_SECONDS (0.2), CHECKPOINT_EVERY (5), KEEP_CHECKPOINTS (3),
LEARNING_RATE (0.05).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

STEP_DIR = re.compile(r"^step-(\d+)$")
SIGNALLED, PEER_STOPPED = 143, 75  # 75 (EX_TEMPFAIL): torchrun restarts the workers of a surviving node
stop_requested = threading.Event()


def setting(name: str, default: str) -> str:
    return os.environ.get(name) or default


RANK, WORLD = int(setting("RANK", "0")), int(setting("WORLD_SIZE", "1"))
LOCAL_RANK = int(setting("LOCAL_RANK", "0"))
NODES, NODE = int(setting("TI_NODES", "1")), int(setting("TI_NODE_RANK", "0"))


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [trainer rank {RANK}] {message}", flush=True)


def complete_steps(folder: Path) -> list[int]:
    """Steps here with DCP's .metadata and every node's marker, oldest first."""
    wanted = {".metadata", *(f".node-{k}.done" for k in range(NODES))}
    found = []
    for path in folder.glob("step-*"):
        match = STEP_DIR.fullmatch(path.name)
        if match and path.is_dir() and all((path / name).is_file() for name in wanted):
            found.append(int(match.group(1)))
    return sorted(found)


def agreed_step(folder: Path) -> int | None:
    """The newest step complete on every node's disk (each rank reads its own node's folder)."""
    mine = complete_steps(folder)
    if WORLD == 1:
        return mine[-1] if mine else None
    everyone: list[list[int]] = [[] for _ in range(WORLD)]
    dist.all_gather_object(everyone, mine)
    common = set(everyone[0]).intersection(*everyone[1:])
    return max(common) if common else None


def load_data(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(data_dir.rglob("*.csv"))
    if not files:
        raise SystemExit(f"no CSV files under DATA_DIR={data_dir}")
    table = np.vstack([np.loadtxt(f, delimiter=",", skiprows=1, ndmin=2) for f in files])
    table = table[RANK::WORLD]  # each rank its share of the rows
    return torch.tensor(table[:, :-1], dtype=torch.float32), torch.tensor(table[:, -1:], dtype=torch.float32)


def beat(path: str, step: int, loss: float) -> None:
    if not path or LOCAL_RANK != 0:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(json.dumps({"step": step, "loss": loss, "metrics": {"loss": loss, "world_size": WORLD}}))
    partial.replace(target)


def save(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: int) -> None:
    """Every rank writes its shards; then each node's first worker writes the node's marker."""
    model_state, optim_state = get_state_dict(model, optimizer)
    target = folder / f"step-{step:06d}"
    dcp.save({"model": model_state, "optim": optim_state, "step": torch.tensor(step)}, checkpoint_id=target)
    if WORLD > 1:
        dist.barrier()  # every rank's shards are on disk, and rank 0's .metadata
    if LOCAL_RANK == 0:
        marker = target / f".node-{NODE}.done"
        marker.with_suffix(".tmp").write_bytes(b"")
        marker.with_suffix(".tmp").replace(marker)
        log(f"checkpoint step-{step:06d}")
        # The newest `keep` steps this node saved stay (a complete one among them once the agent pulled the rest).
        saved = sorted(
            int(m.group(1))
            for p in folder.glob(f"step-*/.node-{NODE}.done")
            if (m := STEP_DIR.fullmatch(p.parent.name))
        )
        for old in saved[:-keep]:
            shutil.rmtree(folder / f"step-{old:06d}", ignore_errors=True)


def main() -> int:
    data_dir = Path(setting("DATA_DIR", "/data"))
    output_dir = Path(setting("OUTPUT_DIR", "/outputs"))
    folder = Path(setting("CHECKPOINT_DIR", "/checkpoints"))
    steps = int(setting("STEPS", "60"))
    step_seconds = float(setting("STEP_SECONDS", "0.2"))
    every = int(setting("CHECKPOINT_EVERY", "5"))
    keep = int(setting("KEEP_CHECKPOINTS", "3"))
    rate = float(setting("LEARNING_RATE", "0.05"))
    folder.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())

    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{LOCAL_RANK}" if cuda else "cpu")
    if WORLD > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        log(f"joined the process group: {WORLD} ranks, node {NODE} of {NODES}")
    torch.manual_seed(0)
    model: torch.nn.Module = torch.nn.Linear(3, 1).to(device)
    if WORLD > 1:
        model = DistributedDataParallel(model, device_ids=[LOCAL_RANK] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=rate, momentum=0.5)
    features, target = (t.to(device) for t in load_data(data_dir))

    start = 0
    resume = agreed_step(folder)
    if resume is not None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=folder / f"step-{resume:06d}")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
        log(f"resumed from step-{resume:06d} (step {start})")
    log(f"run {setting('RUN_ID', '?')}: steps {start + 1}..{steps}")

    loss, step, stop = float("nan"), start, False
    while step < steps:
        step += 1
        optimizer.zero_grad()
        error = torch.nn.functional.mse_loss(model(features), target)
        error.backward()
        optimizer.step()
        loss = float(error)
        flag = torch.tensor([1.0 if stop_requested.is_set() else 0.0], device=device)
        if WORLD > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's SIGTERM stops every rank at this step
        stop = bool(flag.item())
        log(f"step {step}/{steps} loss {loss:.6f}")
        beat(setting("HEARTBEAT_FILE", ""), step, loss)
        if stop or step % every == 0 or step == steps:
            save(folder, step, model, optimizer, keep)
        if stop:
            break
        time.sleep(step_seconds)

    if RANK == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu() for k, v in get_state_dict(model, optimizer)[0].items()}
        torch.save(weights, output_dir / "model.pt")
        metrics = {"run_id": setting("RUN_ID", ""), "steps_completed": step, "resumed_from_step": start or None,
                   "final_loss": loss, "interrupted": stop, "world_size": WORLD}  # fmt: skip
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if WORLD > 1:
        dist.destroy_process_group()
    if stop:
        log(f"stopped at step {step} after saving ({'SIGTERM' if stop_requested.is_set() else 'a peer stopped'})")
        return SIGNALLED if stop_requested.is_set() else PEER_STOPPED
    log("finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
