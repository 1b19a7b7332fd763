"""One object for the layout of a fused megatron linear, used in both directions: HF
matrices -> fused weight (converter), fused -> HF (exporter), a TP rank's slice of the
fused weight (checkpoint loader), and one target's rows inside a rank's shard (adapters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class FusedLayout:
    """The output rows of one megatron linear as ``groups`` equal blocks, each holding its
    pieces' rows one after another.

    ``linear_qkv``: query groups, each [q heads of the group; k; v], and a ColumnParallel
    split gives each rank whole groups (``split="groups"``). ``linear_fc1``: one block
    [gate; up], and the split gives each rank a slice of every piece (``split="pieces"``).
    An unfused linear is one block with one piece; a RowParallel one (``shard_dim=1``) is
    split over its input columns, its rows whole on every rank.
    """

    groups: int
    pieces: tuple[tuple[str, int], ...]  # (HF projection, rows per group), in storage order
    split: Literal["groups", "pieces"] = "pieces"
    shard_dim: int = 0

    @property
    def group_rows(self) -> int:
        return sum(rows for _, rows in self.pieces)

    @property
    def rows(self) -> int:
        return self.groups * self.group_rows

    def _offset(self, target: str) -> tuple[int, int]:
        offset = 0
        for name, rows in self.pieces:
            if name == target:
                return offset, rows
            offset += rows
        raise KeyError(f"{target} is not in this layout ({[n for n, _ in self.pieces]})")

    # ---- HF <-> fused (global) ------------------------------------------------------------
    def fuse(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The global fused weight (or 1-D bias) from the HF tensors of its pieces."""
        trailing = tuple(parts[self.pieces[0][0]].shape[1:])
        blocks = [parts[name].reshape(self.groups, rows, *trailing) for name, rows in self.pieces]
        return torch.cat(blocks, dim=1).reshape(self.rows, *trailing)

    def unfuse(self, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """The HF tensors of the pieces from a global fused one (the inverse of ``fuse``)."""
        trailing = tuple(fused.shape[1:])
        grouped = fused.reshape(self.groups, self.group_rows, *trailing)
        out = {}
        for name, rows in self.pieces:
            offset, _ = self._offset(name)
            out[name] = grouped[:, offset : offset + rows].reshape(self.groups * rows, *trailing).clone()
        return out

    # ---- tensor parallelism ----------------------------------------------------------------
    def local(self, tp: int) -> "FusedLayout":
        """The layout of each TP rank's shard (checks that TP divides what it splits)."""
        if tp == 1 or self.shard_dim == 1:
            return self
        if self.split == "groups":
            if self.groups % tp:
                raise ValueError(f"TP size {tp} does not divide the {self.groups} query groups (KV heads)")
            return FusedLayout(self.groups // tp, self.pieces, self.split, self.shard_dim)
        for name, rows in self.pieces:
            if rows % tp:
                raise ValueError(f"TP size {tp} does not divide the {rows} rows of {name}")
        return FusedLayout(self.groups, tuple((n, r // tp) for n, r in self.pieces), self.split, self.shard_dim)

    def shard_index(self, shape: tuple[int, ...], tp: int, rank: int) -> list[tuple[slice, ...]]:
        """Index expressions (one per contiguous block, concatenated on dim 0) taking TP
        rank ``rank``'s shard out of the global fused tensor of ``shape``."""
        local = self.local(tp)
        if self.shard_dim == 1:
            if shape[1] % tp:
                raise ValueError(f"TP size {tp} does not divide the {shape[1]} input columns")
            n = shape[1] // tp
            return [(slice(None), slice(rank * n, (rank + 1) * n))]
        if self.split == "groups":
            n = local.rows
            return [(slice(rank * n, (rank + 1) * n),)]
        index = []
        for g in range(self.groups):
            offset = g * self.group_rows
            for (_, rows), (_, local_rows) in zip(self.pieces, local.pieces):
                start = offset + rank * local_rows
                index.append((slice(start, start + local_rows),))
                offset += rows
        return index

    def shard(self, fused: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        """TP rank ``rank``'s shard of a global fused tensor (a copy)."""
        parts = [fused[idx] for idx in self.shard_index(tuple(fused.shape), tp, rank)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).clone()

    # ---- one target inside a (local) shard -------------------------------------------------
    def view(self, weight: torch.Tensor, target: str) -> torch.Tensor:
        """The target's rows of ``weight`` (laid out as this layout) as a (groups, rows, in)
        view, no copy."""
        offset, rows = self._offset(target)
        return weight.view(self.groups, self.group_rows, -1)[:, offset : offset + rows]

    def add_into(self, out: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``out`` (..., this layout's rows) plus each target's output (..., groups * rows) at
        that target's rows, added in place into views of ``out``: an untargeted piece (gate
        beside a targeted up) costs nothing, where ``out + combine(...)`` would build a
        full-width, zero-padded delta. ``combine`` with a zero base, without the zeros."""
        if len(self.pieces) == 1:
            (d,) = outputs.values()
            return out + d.to(out.dtype)
        lead = out.shape[:-1]
        grouped = out.view(*lead, self.groups, self.group_rows)
        for name, d in outputs.items():
            offset, rows = self._offset(name)
            grouped[..., offset : offset + rows] += d.to(out.dtype).view(*lead, self.groups, rows)
        return out

    def combine(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-target outputs (..., groups * rows) interleaved into this layout's rows; a
        missing target contributes zeros."""
        if len(self.pieces) == 1:
            return outputs[self.pieces[0][0]]
        any_output = next(iter(outputs.values()))
        lead = any_output.shape[:-1]
        parts = []
        for name, rows in self.pieces:
            d = outputs.get(name)
            if d is None:
                d = any_output.new_zeros(*lead, self.groups * rows)
            parts.append(d.view(*lead, self.groups, rows))
        return torch.cat(parts, dim=-1).view(*lead, self.rows)
