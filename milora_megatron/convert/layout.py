"""How HF Llama matrices map onto megatron's fused, tensor-parallel weights (and back)."""

from __future__ import annotations

import torch


def _check_divides(tp: int, n: int, what: str) -> None:
    if n % tp:
        raise ValueError(f"TP size {tp} does not divide {what} ({n})")


def qkv_shard(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
              tp: int, rank: int) -> torch.Tensor:
    """This rank's rows of megatron's linear_qkv: per query group [q heads; k; v]."""
    _check_divides(tp, groups, "the number of query groups (KV heads)")
    hd = q.shape[0] // heads
    per = heads // groups
    hidden = q.shape[1]
    qg = q.view(groups, per * hd, hidden)
    kg = k.view(groups, hd, hidden)
    vg = v.view(groups, hd, hidden)
    fused = torch.cat([qg, kg, vg], dim=1)  # (groups, (per + 2) * hd, hidden)
    local = groups // tp
    return fused[rank * local : (rank + 1) * local].reshape(-1, hidden).clone()


def fc1_shard(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This rank's rows of megatron's gated linear_fc1: [gate_t; up_t]."""
    _check_divides(tp, gate.shape[0], "the FFN size")
    return torch.cat([row_shard(gate, tp, rank), row_shard(up, tp, rank)]).clone()


def row_shard(w: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """ColumnParallel split: output rows."""
    _check_divides(tp, w.shape[0], "the output size")
    n = w.shape[0] // tp
    return w[rank * n : (rank + 1) * n].clone()


def col_shard(w: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """RowParallel split: input columns."""
    _check_divides(tp, w.shape[1], "the input size")
    n = w.shape[1] // tp
    return w[:, rank * n : (rank + 1) * n].clone()
