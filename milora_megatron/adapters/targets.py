"""Where each Hugging Face projection lives inside megatron's (possibly fused) linears.

megatron's ``linear_qkv`` holds, on each TP rank, its query groups one after another, each
as ``[q heads of the group; k; v]``; ``linear_fc1`` holds ``[gate; up]`` per rank. A target's
rows on a rank are therefore ``groups`` equal blocks at a fixed offset inside each group:
exactly that rank's TP shard of the HF matrix, in HF row order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# HF name -> (megatron submodule path inside a TransformerLayer, shard_dim)
MODULE_OF_TARGET = {
    "q_proj": ("self_attention.linear_qkv", 0),
    "k_proj": ("self_attention.linear_qkv", 0),
    "v_proj": ("self_attention.linear_qkv", 0),
    "o_proj": ("self_attention.linear_proj", 1),
    "gate_proj": ("mlp.linear_fc1", 0),
    "up_proj": ("mlp.linear_fc1", 0),
    "down_proj": ("mlp.linear_fc2", 1),
}

HF_MODULE_PREFIX = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@dataclass(frozen=True)
class Layout:
    """The local output rows of one megatron linear as ``groups`` x [piece rows ...]."""

    groups: int
    pieces: tuple[tuple[str, int], ...]  # (target, rows per group) in storage order

    @property
    def group_rows(self) -> int:
        return sum(rows for _, rows in self.pieces)

    def _offset(self, target: str) -> tuple[int, int]:
        offset = 0
        for name, rows in self.pieces:
            if name == target:
                return offset, rows
            offset += rows
        raise KeyError(target)

    def rows_of(self, target: str) -> int:
        return self.groups * self._offset(target)[1]

    def view(self, weight: torch.Tensor, target: str) -> torch.Tensor:
        """The target's local rows of ``weight`` as a (groups, rows, in) view (no copy)."""
        offset, rows = self._offset(target)
        return weight.view(self.groups, self.group_rows, -1)[:, offset : offset + rows]

    def combine(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """Interleave per-target outputs (..., groups*rows) into the fused layout."""
        if len(self.pieces) == 1:
            return deltas[self.pieces[0][0]]
        any_delta = next(iter(deltas.values()))
        lead = any_delta.shape[:-1]
        parts = []
        for name, rows in self.pieces:
            d = deltas.get(name)
            if d is None:
                d = any_delta.new_zeros(*lead, self.groups * rows)
            parts.append(d.view(*lead, self.groups, rows))
        return torch.cat(parts, dim=-1).view(*lead, self.groups * self.group_rows)


def layout_for(module_path: str, config, tp_size: int, local_out: int) -> Layout:
    """The layout of one of a TransformerLayer's linears for a megatron TransformerConfig."""
    if module_path == "self_attention.linear_qkv":
        heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
        if groups % tp_size:
            raise ValueError(f"TP size {tp_size} does not divide the {groups} query groups (KV heads)")
        hd = config.kv_channels
        per_group = heads // groups
        return Layout(groups // tp_size, (("q_proj", per_group * hd), ("k_proj", hd), ("v_proj", hd)))
    if module_path == "mlp.linear_fc1":
        if config.gated_linear_unit:
            return Layout(1, (("gate_proj", local_out // 2), ("up_proj", local_out // 2)))
        return Layout(1, (("up_proj", local_out),))
    if module_path == "self_attention.linear_proj":
        return Layout(1, (("o_proj", local_out),))
    if module_path == "mlp.linear_fc2":
        return Layout(1, (("down_proj", local_out),))
    raise KeyError(module_path)
