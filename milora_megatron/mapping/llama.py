"""Hugging Face Llama <-> megatron-core GPTModel (local spec): tensor names, each decoder
layer's fused layouts, and conversion of one layer in either direction.

Megatron's *global* layout (the one every TP size slices, and megatron's distributed
checkpoints store): ``linear_qkv`` as query groups one after another, each [q heads; k; v];
``linear_fc1`` as [gate; up]. Base checkpoints are stored in it (checkpoint/base.py).
"""

from __future__ import annotations

import torch

from .fused import FusedLayout
from .projections import PROJECTIONS

EMBEDDING = ("model.embed_tokens.weight", "embedding.word_embeddings.weight")
FINAL_NORM = ("model.norm.weight", "decoder.final_layernorm.weight")
LM_HEAD = ("lm_head.weight", "output_layer.weight")
# HF name inside a layer -> megatron name inside a layer, for the norms (1:1, replicated over TP)
LAYER_NORMS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}
HF_LAYER_NAMES = (*LAYER_NORMS, *(p.hf_weight for p in PROJECTIONS.values()))


def hf_layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def megatron_layer_prefix(i: int) -> str:
    return f"decoder.layers.{i}."


def layer_layouts(heads: int, kv_heads: int, head_dim: int, ffn: int, hidden: int,
                  gated: bool = True) -> dict[str, FusedLayout]:
    """The global layout of each linear of a decoder layer, keyed by its megatron module."""
    per_group = heads // kv_heads
    return {
        "self_attention.linear_qkv": FusedLayout(
            kv_heads, (("q_proj", per_group * head_dim), ("k_proj", head_dim), ("v_proj", head_dim)), split="groups"),
        "self_attention.linear_proj": FusedLayout(1, (("o_proj", hidden),), shard_dim=1),
        "mlp.linear_fc1": FusedLayout(1, (("gate_proj", ffn), ("up_proj", ffn)) if gated else (("up_proj", ffn),)),
        "mlp.linear_fc2": FusedLayout(1, (("down_proj", hidden),), shard_dim=1),
    }


def hf_layer_shapes(heads: int, kv_heads: int, head_dim: int, ffn: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor of a decoder layer (names relative to the layer)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    rows = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn)}
    return {**{name: (hidden,) for name in LAYER_NORMS}, **{p.hf_weight: rows[p.name] for p in PROJECTIONS.values()}}


def hf_to_megatron_layer(hf: dict[str, torch.Tensor], layouts: dict[str, FusedLayout]) -> dict[str, torch.Tensor]:
    """One layer: HF names (relative to the layer) -> megatron names, global layout."""
    out = {meg: hf[name] for name, meg in LAYER_NORMS.items()}
    for module, layout in layouts.items():
        out[f"{module}.weight"] = layout.fuse({p: hf[PROJECTIONS[p].hf_weight] for p, _ in layout.pieces})
    return out


def megatron_to_hf_layer(meg: dict[str, torch.Tensor], layouts: dict[str, FusedLayout]) -> dict[str, torch.Tensor]:
    """The exact inverse of ``hf_to_megatron_layer``."""
    out = {name: meg[m] for name, m in LAYER_NORMS.items()}
    for module, layout in layouts.items():
        for p, tensor in layout.unfuse(meg[f"{module}.weight"]).items():
            out[PROJECTIONS[p].hf_weight] = tensor
    return out


def layout_of(megatron_name: str, layouts: dict[str, FusedLayout]) -> FusedLayout | None:
    """The layout of a megatron layer tensor ("decoder.layers.3.mlp.linear_fc1.weight"), or
    None for the tensors every TP rank holds whole (norms)."""
    module = megatron_name.rsplit(".", 1)[0]
    for path, layout in layouts.items():
        if module.endswith(path):
            return layout
    return None
