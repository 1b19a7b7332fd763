"""Low-rank adapters inside megatron-core's tensor-parallel linears.

The adapted classes subclass ``ColumnParallelLinear`` / ``RowParallelLinear`` and override
only ``_forward_impl`` (the local matmul), so megatron keeps doing its own input handling
and output reduction, and the base weight keeps its name and checkpoint sharding:

* ColumnParallel: A (r x in) replicated, B split by output rows. ``h = A x`` is r-wide;
  its backward all-reduce (or, with sequence parallelism, all-gather forward /
  reduce-scatter backward) is the only adapter communication. Under SP each rank's dA
  covers its sequence chunk only, so A's gradient is all-reduced in backward.
* RowParallel: A split by input columns, B replicated. ``B (A_t x_t)`` is added to the
  base's partial output *before* megatron's reduction, so the forward needs no extra
  collective; dB is a partial sum over ranks and is all-reduced (out x r) in backward.

Per-target adapters on fused linears (q/k/v in ``linear_qkv``, gate/up in ``linear_fc1``)
share one input projection (their A's stacked) and are interleaved back by their
``mapping.FusedLayout``.

An MoE expert's linears (``is_expert``) leave their communication to megatron's token
dispatcher (``explicit_expert_comm``): a column expert's input is already every token on
each expert-TP rank, and the partial input gradients of the ranks are summed by the
dispatcher. So its adapter neither gathers nor all-reduces ``h``: each rank's dA is its
partial sum, all-reduced over the expert-TP group in backward (as under sequence
parallelism), and its input gradient stays partial, as the base weight's does. Megatron's
``sequence_parallel`` flag does not apply to an expert's linears.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    get_cuda_rng_tracker,
    set_tensor_model_parallel_attributes,
)

from ..mapping import FusedLayout


class TargetAdapter(torch.nn.Module):
    """A and B of one HF projection on this rank, and the initial B0, A0 they started from.

    All four are float32 whatever the model's dtype: an AdamW update smaller than ~0.4% of
    an entry vanishes when rounded to bf16 (8 significant bits), which is the scale of
    MiLoRA's minor components and of every update late in a decaying schedule. The forward
    casts them to the activation dtype; gradients, optimizer state, reductions and
    checkpoints stay float32. At initialisation A == A0 and B == B0 exactly, so their casts
    agree bit for bit and the branch residual mode leaves the output unchanged.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, train_a: bool, train_b: bool,
                 initial: bool, residual_branch: bool, split_dims: tuple[int | None, int | None] = (None, None)):
        super().__init__()
        a, b = a.float(), b.float()
        self.lora_A = torch.nn.Parameter(a.clone(), requires_grad=train_a)
        self.lora_B = torch.nn.Parameter(b.clone(), requires_grad=train_b)
        for param, dim in zip((self.lora_A, self.lora_B), split_dims):
            # megatron's own marks: a factor split over TP is "tensor_model_parallel"; a
            # replicated one is a duplicate that clipping counts once (see train.gradients)
            set_tensor_model_parallel_attributes(param, dim is not None, 0 if dim is None else dim, 1)
        self.scaling = scaling
        self.residual_branch = residual_branch and initial
        if initial:
            self.register_buffer("lora_A0", a.clone())
            self.register_buffer("lora_B0", b.clone())
        else:
            self.lora_A0 = self.lora_B0 = None

    def extra_repr(self) -> str:
        r, n_in = self.lora_A.shape
        return f"r={r}, in={n_in}, out={self.lora_B.shape[0]}, scaling={self.scaling}, residual_branch={self.residual_branch}"


class _FactorMatmul(torch.autograd.Function):
    """``x @ w^T`` for an fp32 master factor ``w`` and lower-precision activations ``x``: the
    forward and the input gradient in the activation dtype, the factor's gradient accumulated
    and returned in fp32 (as megatron's fused weight-gradient accumulation does), not
    rounded to bf16 first. On a GPU one bf16 GEMM with fp32 output (``out_dtype``), else
    an fp32 GEMM of the upcast operands (bf16 values are exact in fp32)."""

    @staticmethod
    def forward(ctx, x, w):
        w_low = w.to(x.dtype)
        ctx.save_for_backward(x, w_low)
        return x @ w_low.t()

    @staticmethod
    def backward(ctx, grad):
        x, w_low = ctx.saved_tensors
        grad_x = grad @ w_low if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            grad_w = _fp32_out_mm(g2.t(), x2)
        return grad_x, grad_w


_OUT_DTYPE_MM = {"usable": None}  # whether torch.mm(..., out_dtype=float32) works here (decided once)


def _fp32_out_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_cuda and _OUT_DTYPE_MM["usable"] is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _OUT_DTYPE_MM["usable"] = True
            return out
        except (RuntimeError, TypeError):
            _OUT_DTYPE_MM["usable"] = False
    return a.float() @ b.float()


def factor_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w^T`` with ``w`` an fp32 factor (or a difference of factors): a plain matmul in
    fp32; for bf16/fp16 activations the factor's gradient stays fp32 (``_FactorMatmul``)."""
    if x.dtype == w.dtype or not w.requires_grad:
        return x @ w.to(x.dtype).t()
    return _FactorMatmul.apply(x, w)


class _AdapterHost:
    """Adapter state and the delta computation, shared by the two parallel linears."""

    adapter_layout: FusedLayout
    adapter_shard_dim: int

    def _init_adapter_host(self, layout: FusedLayout, shard_dim: int, dropout: float) -> None:
        self.adapter_layout = layout
        self.adapter_shard_dim = shard_dim
        self.adapter_dropout = dropout
        self.adapters = torch.nn.ModuleDict()
        self.adapters_enabled = True

    @property
    def _tp_size(self) -> int:
        return self.tp_group.size() if self.tp_group is not None else 1

    @property
    def _expert_comm(self) -> bool:
        """An expert linear whose communication the MoE dispatcher does (see the module doc)."""
        return bool(getattr(self, "explicit_expert_comm", False))

    @property
    def _sequence_parallel(self) -> bool:
        return bool(self.sequence_parallel) and not self._expert_comm

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.adapter_dropout == 0.0:
            return x
        # Replicated inputs need the same mask on every TP rank (default stream); sharded
        # inputs (row-parallel, or sequence-parallel chunks) need a per-rank stream.
        replicated = self.adapter_shard_dim == 0 and not self._sequence_parallel
        ctx = contextlib.nullcontext() if replicated or self._tp_size == 1 else get_cuda_rng_tracker().fork()
        with ctx:
            return F.dropout(x, self.adapter_dropout, training=True)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``adapter_deltas`` interleaved into the linear's output rows."""
        return self.adapter_layout.combine(self.adapter_deltas(x))

    def adapter_deltas(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """s (B A x' - B0 A0 x) per adapter (x' = dropout(x); the B0 A0 term only in branch
        mode), interleaved into the linear's output rows.

        Branch mode computes it from the factors' drift, as one GEMM over stacked operands:
        ``[(A - A0) x' + A0 (x' - x), A0 x] @ [B, B - B0]^T``. A - A0 and B - B0 are taken in
        fp32 before the cast to the activation dtype, so a bf16 delta carries the update
        itself instead of the rounding noise of two near-equal products; at init both
        drifts are exactly zero, so the model starts bit-identical whatever kernels run.
        """
        adapters = list(self.adapters.items())
        tp = self._tp_size
        column = self.adapter_shard_dim == 0
        dropping = self.training and self.adapter_dropout > 0.0
        branch = [name for name, ad in adapters if ad.residual_branch]
        # rows of the GEMM on the dropped-out input: A (or A - A0 in branch mode) per adapter,
        # then A0 of the branch adapters when dropout makes x' differ from x
        rows = [ad.lora_A - ad.lora_A0 if ad.residual_branch else ad.lora_A for _, ad in adapters]
        splits = [ad.lora_A.shape[0] for _, ad in adapters]
        if dropping and branch:
            rows += [self.adapters[n].lora_A0 for n in branch]
            splits += [self.adapters[n].lora_A0.shape[0] for n in branch]
        a = torch.cat(rows) if len(rows) > 1 else rows[0]
        if column and (self._sequence_parallel or self._expert_comm) and tp > 1:
            a = copy_to_tensor_model_parallel_region(a, group=self.tp_group)  # dA: sum over chunks / ranks (fp32)
        h = factor_matmul(self._dropout(x), a)
        if branch:
            a0 = torch.cat([self.adapters[n].lora_A0 for n in branch])
            h = torch.cat([h, x @ a0.to(x.dtype).t()], dim=-1)
            splits += [self.adapters[n].lora_A0.shape[0] for n in branch]
        if column and tp > 1 and not self._expert_comm:
            if self._sequence_parallel:
                h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
            else:
                h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        hs = torch.split(h, splits, dim=-1)
        n = len(adapters)
        h0d = dict(zip(branch, hs[n:n + len(branch)])) if dropping else {}
        h0 = dict(zip(branch, hs[len(hs) - len(branch):]))
        deltas = {}
        for (name, ad), h_i in zip(adapters, hs):
            b = ad.lora_B
            if not column and tp > 1 and b.requires_grad:
                b = copy_to_tensor_model_parallel_region(b, group=self.tp_group)  # dB: sum over ranks (fp32)
            if name in h0:
                drift = h_i + (h0d[name] - h0[name]) if name in h0d else h_i
                stacked_h = torch.cat([drift, h0[name]], dim=-1)
                stacked_b = torch.cat([b, b - ad.lora_B0], dim=1)
                d = factor_matmul(stacked_h, stacked_b)
            else:
                d = factor_matmul(h_i, b)
            deltas[name] = d * ad.scaling
        return deltas

    def base_restoring_deltas(self, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """+s*B0*A0 x for adapters whose residual was merged into W: with it, a disabled
        adapter gives the original model back in both residual modes."""
        merged = [(n, ad) for n, ad in self.adapters.items() if ad.lora_A0 is not None and not ad.residual_branch]
        if not merged:
            return None
        h = x @ torch.cat([ad.lora_A0 for _, ad in merged]).to(x.dtype).t()
        if self.adapter_shard_dim == 0 and self._sequence_parallel and self._tp_size > 1:
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
        hs = torch.split(h, [ad.lora_A0.shape[0] for _, ad in merged], dim=-1)
        return {n: ad.scaling * (h_i @ ad.lora_B0.to(h_i.dtype).t()) for (n, ad), h_i in zip(merged, hs)}

    def _forward_impl(self, input, weight, *args, **kwargs):
        out = super()._forward_impl(input, weight, *args, **kwargs)
        if len(self.adapters) == 0:
            return out
        deltas = self.adapter_deltas(input) if self.adapters_enabled else self.base_restoring_deltas(input)
        return out if deltas is None else self.adapter_layout.add_into(out, deltas)


class AdaptedColumnParallelLinear(_AdapterHost, ColumnParallelLinear):
    pass


class AdaptedRowParallelLinear(_AdapterHost, RowParallelLinear):
    pass


def adapt_in_place(module, layout: FusedLayout, dropout: float):
    """Turn an existing megatron linear into its adapted subclass without copying its weight."""
    if type(module) is ColumnParallelLinear:
        module.__class__ = AdaptedColumnParallelLinear
        shard_dim = 0
    elif type(module) is RowParallelLinear:
        module.__class__ = AdaptedRowParallelLinear
        shard_dim = 1
    elif isinstance(module, _AdapterHost):
        return module
    else:
        raise TypeError(
            f"cannot adapt {type(module).__name__}: only megatron-core's ColumnParallelLinear and "
            "RowParallelLinear (the local spec) are supported"
        )
    if layout.shard_dim != shard_dim:
        raise ValueError(f"{type(module).__name__} is split on dim {shard_dim}, its layout says {layout.shard_dim}")
    module._init_adapter_host(layout, shard_dim, dropout)
    return module


def set_adapters_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Switch every adapter's delta on or off (off: the base model, in both residual modes)."""
    for m in model.modules():
        if isinstance(m, _AdapterHost):
            m.adapters_enabled = enabled


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run the base model: every adapter's delta switched off (e.g. the forgetting reference)."""
    hosts = [m for m in model.modules() if isinstance(m, _AdapterHost)]
    previous = [m.adapters_enabled for m in hosts]
    set_adapters_enabled(model, False)
    try:
        yield
    finally:
        for m, p in zip(hosts, previous):
            m.adapters_enabled = p
