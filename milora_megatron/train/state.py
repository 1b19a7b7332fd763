"""Everything besides the adapter factors that a bit-exact resume needs, one file per rank:
optimizer, step, data position, RNG states (torch, megatron's tracker, numpy, python)."""

from __future__ import annotations

import glob
import os
import random
import shutil

import numpy as np
import torch

from ..checkpoint.adapters import CHECKPOINTS, LATEST, AdapterCheckpoint, shard_group, shard_position
from ..device import on_gpu
from ..errors import CheckpointError


def rank_file(rank: int) -> str:
    """The name of a rank's training-state file inside a checkpoint folder."""
    return f"train_state_rank{rank:05d}.pt"


def rng_state(device: torch.device) -> dict:
    """Every RNG stream of this rank; the CUDA one only when the run is on a GPU (asking
    ``torch.cuda`` on a CPU run would open a CUDA context on GPU 0 in every rank)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if on_gpu(device):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and on_gpu(device):
        torch.cuda.set_rng_state(state["cuda"], device)


def state_writer(rank: int, optimizer, step: int, position: int, device: torch.device, extra: dict | None = None):
    """An ``extra_writer`` for ``save_adapter_checkpoint``: this rank's training state."""

    def write(folder: str) -> list[str]:
        # through a file object: a full disk then surfaces as OSError ENOSPC (as the cause of
        # torch's own error), not as a bare "unexpected pos"
        with open(os.path.join(folder, rank_file(rank)), "wb") as f:
            torch.save({"optimizer": optimizer.state_dict(), "step": step, "position": position,
                        "rng": rng_state(device), **(extra or {})}, f)
        return [rank_file(rank)]

    return write


def load_state(ckpt: AdapterCheckpoint, rank: int) -> dict:
    path = os.path.join(ckpt.path, rank_file(rank))
    if not os.path.isfile(path):
        raise CheckpointError(
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


# ---- layout-independent state: resume at another TP, PP or DP size --------------------------
MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_file(stage: int, ep_rank: int | None = None) -> str:
    """A stage's moments file (the layout-free state in its metadata); ``ep_rank``: one
    expert-parallel rank's expert moments."""
    return f"optimizer-stage{stage:03d}" + ("" if ep_rank is None else f"-experts{ep_rank:03d}") + ".safetensors"


def trained_factors(targets):
    """(HF key, parameter, TP split dim) of every trained factor of ``targets``."""
    for t in targets:
        for factor in ("lora_A", "lora_B"):
            param = getattr(t.adapter, factor)
            if param.requires_grad:
                yield f"{t.name}.{factor}", param, t.factor_split_dim(factor)


def gather_moments(targets, optimizer, tp_group=None) -> tuple[dict[str, torch.Tensor], int]:
    """AdamW's moments of this stage's trained factors, unsharded and keyed like the factors
    (``<hf module>.lora_A.exp_avg``), and AdamW's step count. Collective over TP (an
    expert's over its expert-TP group); r-wide."""
    import torch.distributed as dist

    out, adam_step = {}, 0
    for t in targets:
        group = shard_group(t, tp_group)
        tp = group.size() if group is not None else 1
        for key, param, dim in trained_factors([t]):
            state = optimizer.state.get(param, {})
            adam_step = int(float(state.get("step", 0)))
            for moment in MOMENTS:
                local = state.get(moment, torch.zeros_like(param)).detach().float().contiguous()
                if dim is not None and tp > 1:
                    parts = [torch.empty_like(local) for _ in range(tp)]
                    dist.all_gather(parts, local, group=group)
                    local = torch.cat(parts, dim=dim)
                out[f"{key}.{moment}"] = local.cpu().clone()
    return out, adam_step


def write_moments(folder: str, stage: int, moments: dict, meta: dict, ep_rank: int | None = None) -> str:
    from safetensors.torch import save_file

    import json

    name = optimizer_file(stage, ep_rank)
    save_file(moments, os.path.join(folder, name), metadata={"state": json.dumps(meta)})
    return name


def load_moments(ckpt: AdapterCheckpoint, stages: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Every stage's moments, its experts' too (keyed by HF names, so any new PP or EP split
    finds its own), and the global state (step, data position, AdamW step, loss scale)."""
    import json

    from safetensors import safe_open

    moments, meta = {}, None
    expert_files = sorted(n for n in os.listdir(ckpt.path) if n.startswith("optimizer-stage") and "-experts" in n)
    for name in [optimizer_file(stage) for stage in range(stages)] + expert_files:
        with safe_open(os.path.join(ckpt.path, name), framework="pt") as f:
            meta = meta or json.loads(f.metadata()["state"])
            moments.update({k: f.get_tensor(k) for k in f.keys()})
    return moments, meta


def install_moments(targets, optimizer, moments: dict, adam_step: int, tp_rank: int, tp_size: int) -> None:
    """Give this rank's shard of every trained factor its saved AdamW state (``load_state_dict``
    then places it: the parameter's device, fused AdamW's step dtype)."""
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state = {}
    for t in targets:
        for key, param, dim in trained_factors([t]):
            state[index[id(param)]] = _moments_entry(key, param, dim, moments, adam_step,
                                                     *shard_position(t, tp_rank, tp_size))
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)


def _moments_entry(key: str, param, dim, moments: dict, adam_step: int, tp_rank: int, tp_size: int) -> dict:
    """One factor's AdamW state: its shard of the saved moments."""
    entry = {"step": torch.tensor(float(adam_step))}
    for moment in MOMENTS:
        full = moments.get(f"{key}.{moment}")
        if full is None:
            raise CheckpointError(f"the checkpoint's optimizer state lacks {key}.{moment}")
        part = full.chunk(tp_size, dim=dim)[tp_rank] if dim is not None else full
        if tuple(part.shape) != tuple(param.shape):
            raise CheckpointError(f"{key}.{moment}: saved {tuple(part.shape)}, the model has {tuple(param.shape)}")
        entry[moment] = part.clone()
    return entry
