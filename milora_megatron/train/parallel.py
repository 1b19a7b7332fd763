"""The process groups of a run: torch.distributed from torchrun's environment, megatron's
TP/PP/DP groups, and one small record of them that the rest of the trainer is handed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import compat
from ..device import backend_for
from ..errors import ConfigError


@dataclass(frozen=True)
class ParallelGroups:
    tp: object
    pp: object
    dp: object
    mp: object  # TP x PP: every rank holding a different part of one model replica
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    pp_last_rank: int  # global rank of this pipeline's last stage
    host: object = None  # every rank over gloo: waits while one rank works on the CPU (never on NCCL)
    # mixture of experts (megatron's expert groups; at ep = 1 and etp = tp they mirror the dense ones)
    ep_size: int = 1
    ep_rank: int = 0
    etp_size: int = 1
    etp_rank: int = 0
    expert_dp: object = None  # the ranks holding the same experts: their gradients are summed over it
    expert_dp_size: int = 1
    expert_dp_rank: int = 0
    expert_mp: object = None  # expert TP x EP x PP: every rank holding different experts of one model

    @classmethod
    def from_megatron(cls, host=None) -> "ParallelGroups":
        from megatron.core import parallel_state as ps

        return cls(host=host,
            ep_size=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(), etp_rank=ps.get_expert_tensor_parallel_rank(),
            expert_dp=ps.get_expert_data_parallel_group(), expert_dp_size=ps.get_expert_data_parallel_world_size(),
            expert_dp_rank=ps.get_expert_data_parallel_rank(),
            expert_mp=ps.get_expert_tensor_model_pipeline_parallel_group(),
            tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
            dp=ps.get_data_parallel_group(), mp=ps.get_model_parallel_group(),
            tp_size=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
            pp_last_rank=ps.get_pipeline_model_parallel_last_rank(),
        )


def init_distributed(device: torch.device, tp: int, pp: int, seed: int, timeout_minutes: int = 30, ep: int = 1,
                     etp: int | None = None) -> ParallelGroups:
    """torch.distributed (NCCL on a GPU, gloo on the CPU) and megatron's groups, every one
    with ``timeout_minutes``; a gloo group over all ranks for host-side waits (tokenising,
    checksums, the run folder's plan: an NCCL barrier would spin a GPU and abort at its
    timeout); then the seeds megatron's model construction expects (the same everywhere).
    ``ep``/``etp``: megatron's expert-parallel and expert-TP sizes (``etp`` None: ``tp``)."""
    from megatron.core import parallel_state as ps

    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a single process without torchrun
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), timeout=timeout)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ConfigError(f"world size {world} is not a multiple of parallel.tp x parallel.pp = {tp * pp}")
    expert_tp = tp if etp is None else etp
    if (world // pp) % (ep * expert_tp):
        raise ConfigError(f"parallel.ep x expert TP = {ep} x {expert_tp} does not divide the {world // pp} ranks of a "
                          f"pipeline stage (world size {world} / parallel.pp {pp}): experts are carved out of DP x TP")
    compat.apply(device)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                     distributed_timeout_minutes=timeout_minutes)
    compat.model_parallel_manual_seed(seed)
    host = None if backend_for(device) == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return ParallelGroups.from_megatron(host=host)


def seed_per_replica(seed: int, groups: ParallelGroups) -> None:
    """Give every data-parallel replica and pipeline stage its own dropout streams.

    Model construction needs the same default stream everywhere (megatron's CPU init draws
    whole matrices and slices them), but after it, replicas that saw the same seed would
    draw the same adapter-dropout masks on different data. TP ranks of one stage keep a
    shared default stream (masks on replicated inputs must agree) and their own
    tensor-parallel streams, as megatron sets them. Rank (dp 0, stage 0) keeps ``seed``.
    """
    offset = 1009 * (groups.dp_rank * groups.pp_size + groups.pp_rank)
    compat.model_parallel_manual_seed(seed + offset)
