"""Where a run computes and in which dtype, and where each collective's tensors must live.

These are decided here and nowhere else. A collective only works on tensors of the device
its group's backend serves: NCCL has no CPU path ("No backend type associated with device
type cpu"), gloo is the CPU backend. Two kinds of tensor reach collectives:

* tensors of the model (weights and the subspace work derived from them, activations,
  gradients, adapter factors) live on the run's device, and the run's backend is chosen
  from that same device (``backend_for``), so they are right by construction;
* host values that ranks must agree on (a stop flag, a token count, a loss sum, a norm)
  are built on ``collective_device(group)``, a function of the group's backend, never on
  a device picked at the call site.
"""

from __future__ import annotations

import os
import typing
from typing import Literal, Sequence

import torch
import torch.distributed as dist

from .errors import ConfigError

Device = Literal["auto", "cuda", "cpu"]
DEVICES = typing.get_args(Device)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Dtype = Literal["auto", "bf16", "fp16", "fp32"]  # auto: bf16 on a GPU, fp32 on the CPU


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if name not in DEVICES:
        raise ConfigError(f"model.device must be one of {list(DEVICES)}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("model.device is cuda but no GPU is visible to this process (CUDA_VISIBLE_DEVICES?)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK {local_rank} has no GPU: {count} visible on this node. Start at most one process per GPU "
            f"(torchrun --nproc_per_node {count}), or run on the CPU with model.device=cpu"
        )
    return torch.device("cuda", local_rank)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The model's (activation and frozen weight) dtype; ``auto``: bf16 on a GPU, fp32 on the CPU.
    Trainable adapter factors are fp32 whatever this is (see adapters.layer)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {['auto', *DTYPES]}, got {name!r}")
    return DTYPES[name]


def on_gpu(device: torch.device) -> bool:
    """Whether this run's own device is a GPU: the question to ask before touching
    ``torch.cuda`` (``torch.cuda.is_available()`` is true on a GPU node even for a
    ``model.device=cpu`` run, and using it opens a CUDA context on GPU 0)."""
    return torch.device(device).type == "cuda"


def backend_for(device: torch.device) -> str:
    """The process-group backend for a run on ``device``."""
    return "nccl" if device.type == "cuda" else "gloo"


def device_type_for_backend(backend: str) -> str:
    """The device type whose tensors a backend's collectives take: "cuda" for NCCL (alone,
    or in a mixed "cpu:gloo,cuda:nccl" spec, where it serves the GPU), "cpu" for gloo, mpi
    and the rest."""
    return "cuda" if "nccl" in backend.lower() else "cpu"


def collective_device(group=None) -> torch.device:
    """The device for tensors handed to a collective over ``group`` (None: the default group)."""
    if not dist.is_initialized():
        return torch.device("cpu")
    if device_type_for_backend(str(dist.get_backend(group))) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def scalars(values: Sequence[float], group=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A small tensor of host values, on the device ``group``'s collectives take."""
    return torch.tensor(list(values), dtype=dtype, device=collective_device(group))


def all_reduce_scalars(values: Sequence[float], group=None, op=dist.ReduceOp.SUM) -> list[float]:
    """Reduce host values over ``group``: one collective and one host sync for all of them."""
    t = scalars(values, group)
    if dist.is_initialized():
        dist.all_reduce(t, op=op, group=group)
    return t.tolist()
