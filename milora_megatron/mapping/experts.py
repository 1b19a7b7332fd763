"""A sparse (mixture-of-experts) MLP: its tensors as a family stores them on disk and as
megatron-core's ``MoELayer`` holds them, in both directions.

On disk (the Hub's layout, which transformers reads and ``save_pretrained`` writes back)
every expert has its own three matrices, under names the family chooses: Qwen3-MoE's
``mlp.experts.{e}.gate_proj``, Mixtral's ``block_sparse_moe.experts.{e}.w1``. Megatron's
``SequentialMLP`` holds each expert as a dense MLP (``linear_fc1`` = [gate; up],
``linear_fc2`` = down) under ``mlp.experts.local_experts.{e}``; base checkpoints store them
by GLOBAL expert index, and an expert-parallel rank reads its own experts' files' slices
(checkpoint/base.py). The router is one (experts x hidden) matrix, frozen, replicated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .fused import FusedLayout

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # our names, as the dense MLP's
ROUTER = "mlp.router.weight"  # megatron's, inside a layer
EXPERT_FC1, EXPERT_FC2 = "linear_fc1", "linear_fc2"


def megatron_expert_prefix(expert: int) -> str:
    """Where expert ``expert`` sits inside a megatron layer (a global index in checkpoints, a
    local one in a model built with expert parallelism)."""
    return f"mlp.experts.local_experts.{expert}."


@dataclass(frozen=True)
class ExpertNames:
    """How a family names a sparse layer's tensors on disk: the block holding them, the
    router, and each projection (ours -> the family's)."""

    block: str = "mlp"
    router: str = "gate"
    projections: dict = field(default_factory=lambda: {p: p for p in EXPERT_PROJECTIONS})

    def router_weight(self) -> str:
        return f"{self.block}.{self.router}.weight"

    def expert_module(self, expert: int, projection: str) -> str:
        """The module's name inside a layer, e.g. "block_sparse_moe.experts.3.w1"."""
        return f"{self.block}.experts.{expert}.{self.projections[projection]}"

    def projection_of(self, name: str) -> str | None:
        """Ours ("up_proj") for a family's projection name ("w3"), None if not one."""
        for ours, theirs in self.projections.items():
            if theirs == name:
                return ours
        return None


@dataclass(frozen=True)
class SparseMLP:
    """One sparse layer's experts: ``experts`` of ``ffn`` x ``hidden`` each."""

    experts: int
    ffn: int
    hidden: int
    names: ExpertNames = ExpertNames()

    def layouts(self) -> dict[str, FusedLayout]:
        """Each expert linear's layout (the same for every expert)."""
        return {EXPERT_FC1: FusedLayout(1, (("gate_proj", self.ffn), ("up_proj", self.ffn))),
                EXPERT_FC2: FusedLayout(1, (("down_proj", self.hidden),), shard_dim=1)}

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """The router's and every expert's tensors with their shapes (names inside a layer)."""
        rows = {"gate_proj": (self.ffn, self.hidden), "up_proj": (self.ffn, self.hidden),
                "down_proj": (self.hidden, self.ffn)}
        out = {self.names.router_weight(): (self.experts, self.hidden)}
        for e in range(self.experts):
            out.update({self.names.expert_module(e, p) + ".weight": rows[p] for p in EXPERT_PROJECTIONS})
        return out

    def to_megatron(self, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {ROUTER: hf[self.names.router_weight()]}
        for e in range(self.experts):
            for module, layout in self.layouts().items():
                parts = {p: hf[self.names.expert_module(e, p) + ".weight"] for p, _ in layout.pieces}
                out[f"{megatron_expert_prefix(e)}{module}.weight"] = layout.fuse(parts)
        return out

    def to_hf(self, meg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The exact inverse of ``to_megatron``."""
        out = {self.names.router_weight(): meg[ROUTER]}
        for e in range(self.experts):
            for module, layout in self.layouts().items():
                for p, tensor in layout.unfuse(meg[f"{megatron_expert_prefix(e)}{module}.weight"]).items():
                    out[self.names.expert_module(e, p) + ".weight"] = tensor
        return out


def expert_of(megatron_name: str) -> tuple[int, str] | None:
    """(expert index, linear) of an expert tensor's megatron name
    ("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight" -> (5, "linear_fc1")),
    None for any other tensor."""
    marker = ".mlp.experts.local_experts."
    if marker not in megatron_name:
        return None
    index, linear = megatron_name.split(marker, 1)[1].split(".")[:2]
    return int(index), linear


def with_expert(megatron_name: str, expert: int) -> str:
    """The same tensor's name for another expert index (local <-> global)."""
    head, tail = megatron_name.split(".mlp.experts.local_experts.", 1)
    return f"{head}.mlp.experts.local_experts.{expert}.{tail.split('.', 1)[1]}"
