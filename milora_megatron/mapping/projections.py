"""The adaptable linear projections of a Llama-style decoder layer: the one table of their
HF names, where they sit in megatron's layer and how tensor parallelism splits them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Projection:
    name: str  # HF module name, e.g. "q_proj"
    hf_block: str  # the HF submodule holding it: "self_attn" or "mlp"
    megatron_module: str  # the megatron linear holding it, inside a TransformerLayer
    shard_dim: int  # 0: ColumnParallel (output rows split over TP), 1: RowParallel (input columns)

    def hf_module(self, layer: int) -> str:
        """The full HF module name, e.g. "model.layers.3.self_attn.q_proj"."""
        return f"model.layers.{layer}.{self.hf_block}.{self.name}"

    @property
    def hf_weight(self) -> str:
        """The weight's name inside an HF layer, e.g. "self_attn.q_proj.weight"."""
        return f"{self.hf_block}.{self.name}.weight"


PROJECTIONS: dict[str, Projection] = {p.name: p for p in (
    Projection("q_proj", "self_attn", "self_attention.linear_qkv", 0),
    Projection("k_proj", "self_attn", "self_attention.linear_qkv", 0),
    Projection("v_proj", "self_attn", "self_attention.linear_qkv", 0),
    Projection("o_proj", "self_attn", "self_attention.linear_proj", 1),
    Projection("gate_proj", "mlp", "mlp.linear_fc1", 0),
    Projection("up_proj", "mlp", "mlp.linear_fc1", 0),
    Projection("down_proj", "mlp", "mlp.linear_fc2", 1),
)}
HF_TARGETS = tuple(PROJECTIONS)  # in layer order
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the MiLoRA paper's
