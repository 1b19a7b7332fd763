"""What happens to the adapter gradients between the backward pass and the optimizer step:
the sum over data-parallel replicas, fp16 loss-scale bookkeeping, the global norm and clipping.

Every factor is a float32 master (adapters.layer.TargetAdapter), so all of this is float32.
The norm is one fused (foreach) reduction and a single host sync per step; which factors
TP ranks hold as copies is read from megatron's own ``tensor_model_parallel`` marks on the
parameters, so a copy is counted once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..device import collective_device


def is_expert(param: torch.Tensor) -> bool:
    """An MoE expert's factor: megatron's own mark (``allreduce`` False: not summed over the
    whole data-parallel group, only over the replicas holding the same expert)."""
    return getattr(param, "allreduce", True) is False


def reduce_over_data_parallel(params: list[torch.Tensor], dp_group, dp_size: int, expert_dp_group=None,
                              expert_dp_size: int = 1) -> None:
    """Sum every adapter gradient over the data-parallel replicas, each exactly once: a dense
    factor's over the data-parallel group, an expert's over its expert-data-parallel group
    (the replicas that hold that expert); one flat all-reduce each."""
    _sum_over([p for p in params if not is_expert(p)], dp_group, dp_size)
    _sum_over([p for p in params if is_expert(p)], expert_dp_group, expert_dp_size)


def _sum_over(params: list[torch.Tensor], group, size: int) -> None:
    if size == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def global_grad_norm(params: list[torch.Tensor], mp_group, expert_mp_group=None, etp_rank: int = 0) -> torch.Tensor:
    """The 2-norm of all adapter gradients of the model (all TP ranks and pipeline stages),
    as a float64 tensor on the model-parallel group's collective device; no host sync.

    Each parameter counts once: a dense factor TP ranks hold as copies on TP rank 0 only,
    summed over the model-parallel group; an expert's factor over the expert-model-parallel
    group (expert TP x EP x PP: every rank holding other experts), its copies on expert-TP
    rank 0 only (an expert's data-parallel replicas are not in that group). A dense model
    passes no ``expert_mp_group``."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    dense = [p.grad for p in params if p.grad is not None and not is_expert(p)
             and param_is_not_tensor_parallel_duplicate(p)]
    experts = [p.grad for p in params if p.grad is not None and is_expert(p)
               and (getattr(p, "tensor_model_parallel", False) or etp_rank == 0)]
    device = collective_device(mp_group)
    sq = _square_norm(dense, device)
    if dist.is_initialized():
        dist.all_reduce(sq, group=mp_group)
    if expert_mp_group is not None:  # an MoE model: every rank takes part, with experts or none
        expert_sq = _square_norm(experts, device)
        if dist.is_initialized():
            dist.all_reduce(expert_sq, group=expert_mp_group)
        sq = sq + expert_sq
    return sq.sqrt()


def _square_norm(grads: list[torch.Tensor], device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    local = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    return local.to(device=device, dtype=torch.float64).square()


def clip_(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale gradients by min(1, max_norm / norm) without a host sync (0 disables clipping)."""
    if max_norm <= 0:
        return
    with_grad = [p for p in params if p.grad is not None]
    if with_grad:
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm.to(with_grad[0].grad.device), foreach=True)


def unscale_(params: list[torch.Tensor], scale: float) -> None:
    if scale != 1.0:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / scale)


class LossScale:
    """fp16's dynamic loss scale: activations' gradients underflow in fp16 unless the loss is
    scaled up; a step whose gradients overflow is skipped and the scale halved, and after
    ``growth_interval`` clean steps it doubles. bf16 and fp32 use a constant scale of 1.

    Overflow is read from the global gradient norm, which every rank already agrees on."""

    def __init__(self, dynamic: bool, initial: float = 2.0**16, growth_interval: int = 1000,
                 min_scale: float = 1.0):
        self.dynamic = dynamic
        self.scale = initial if dynamic else 1.0
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.clean_steps = 0

    def update(self, finite: bool) -> bool:
        """Record a step's outcome; True if the optimizer may step."""
        if not self.dynamic:
            return finite
        if not finite:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self.clean_steps = 0
            return False
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = state["scale"], state["clean_steps"]
