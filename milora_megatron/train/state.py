"""Everything besides the adapter factors that a bit-exact resume needs, one file per rank:
optimizer, step, data position, RNG states (torch, megatron's tracker, numpy, python)."""

from __future__ import annotations

import glob
import os
import random
import shutil

import numpy as np
import torch

from ..checkpoint.adapters import CHECKPOINTS, LATEST, AdapterCheckpoint


def rank_file(rank: int) -> str:
    """The name of a rank's training-state file inside a checkpoint folder."""
    return f"train_state_rank{rank:05d}.pt"


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def state_writer(rank: int, optimizer, step: int, position: int, extra: dict | None = None):
    """An ``extra_writer`` for ``save_adapter_checkpoint``: this rank's training state."""

    def write(folder: str) -> list[str]:
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "position": position,
                    "rng": rng_state(), **(extra or {})}, os.path.join(folder, rank_file(rank)))
        return [rank_file(rank)]

    return write


def load_state(ckpt: AdapterCheckpoint, rank: int) -> dict:
    path = os.path.join(ckpt.path, rank_file(rank))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{ckpt.path} has no training state for rank {rank}: resume needs the same world size "
            "(and TP/PP) it was saved with"
        )
    # to the CPU first: the file names the device it was saved from (cuda:N of another node
    # or local rank); load_state_dict then moves the optimizer state next to its parameters
    return torch.load(path, map_location="cpu", weights_only=False)


def prune(run_dir: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    latest = open(os.path.join(root, LATEST)).read().strip() if os.path.isfile(os.path.join(root, LATEST)) else None
    done = sorted(p for p in glob.glob(os.path.join(root, "step_*")) if "." not in os.path.basename(p))
    for path in done[:-keep_last]:
        if os.path.basename(path) != latest:
            shutil.rmtree(path, ignore_errors=True)
