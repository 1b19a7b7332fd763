"""Hugging Face decoders <-> megatron-core GPTModel (local spec): tensor names, each decoder
layer's fused layouts, and conversion of one layer in either direction. What a family adds
to the Llama layer is declared by the family (models/families/) and passed in here: its
table of norms (``norms``: Gemma 3 has four per layer), Qwen2's q/k/v biases, the q/k norms
of Qwen3 and Gemma 3.

A sparse (mixture-of-experts) layer has no dense MLP: its router and experts are mapped by
``mapping/experts.py`` (``sparse``), the rest of the layer as here.

Megatron's *global* layout (the one every TP size slices, and megatron's distributed
checkpoints store): ``linear_qkv`` as query groups one after another, each [q heads; k; v];
``linear_fc1`` as [gate; up]. Base checkpoints are stored in it (checkpoint/base.py).
"""

from __future__ import annotations

import torch

from .experts import SparseMLP
from .fused import FusedLayout
from .projections import PROJECTIONS

EMBEDDING = ("model.embed_tokens.weight", "embedding.word_embeddings.weight")
FINAL_NORM = ("model.norm.weight", "decoder.final_layernorm.weight")
LM_HEAD = ("lm_head.weight", "output_layer.weight")
# HF name inside a layer -> megatron name inside a layer, for the norms (1:1, replicated over
# TP): Llama's two. A family with other norms declares its own table (models/families/).
LAYER_NORMS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}
# norms applied to a sublayer's output before the residual add (Gemma's "sandwich"): they sit in
# the layer's bias-dropout-add modules (models/layers.py: NormedResidualAdd)
POST_ATTENTION_NORM = "self_attn_bda.norm.weight"
POST_MLP_NORM = "mlp_bda.norm.weight"
# per-head norms (Qwen3, Gemma 3) on q and k (replicated over TP: one head_dim vector each)
QK_NORMS = {"self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
            "self_attn.k_norm.weight": "self_attention.k_layernorm.weight"}
# Qwen2's biases: q, k and v, fused into linear_qkv's bias in the weight's interleave
QKV_BIAS_MODULE = "self_attention.linear_qkv"
QKV_BIASES = ("q_proj", "k_proj", "v_proj")
PROJECTION_WEIGHTS = tuple(p.hf_weight for p in PROJECTIONS.values())
HF_LAYER_NAMES = (*LAYER_NORMS, *PROJECTION_WEIGHTS)  # Llama's
DENSE_MLP = ("mlp.linear_fc1", "mlp.linear_fc2")  # the linears a sparse layer does not have


def hf_bias(projection: str) -> str:
    return PROJECTIONS[projection].hf_weight.removesuffix(".weight") + ".bias"


def hf_layer_names(qkv_bias: bool = False, qk_norm: bool = False, norms: dict = LAYER_NORMS) -> tuple[str, ...]:
    """The HF tensors of one decoder layer (names relative to the layer)."""
    return (*norms, *PROJECTION_WEIGHTS, *(map(hf_bias, QKV_BIASES) if qkv_bias else ()), *(QK_NORMS if qk_norm else ()))


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


def hf_layer_shapes(heads: int, kv_heads: int, head_dim: int, ffn: int, hidden: int, qkv_bias: bool = False,
                    qk_norm: bool = False, norms: dict = LAYER_NORMS,
                    sparse: SparseMLP | None = None) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor of a decoder layer (names relative to the layer);
    ``sparse``: the layer's MLP is that router and its experts."""
    q, kv = heads * head_dim, kv_heads * head_dim
    rows = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn)}
    dense = [p for p in PROJECTIONS.values() if sparse is None or p.megatron_module not in DENSE_MLP]
    out = {**{name: (hidden,) for name in norms}, **{p.hf_weight: rows[p.name] for p in dense}}
    if sparse is not None:
        out.update(sparse.hf_shapes())
    if qkv_bias:
        out.update({hf_bias(p): rows[p][:1] for p in QKV_BIASES})
    if qk_norm:
        out.update({name: (head_dim,) for name in QK_NORMS})
    return out


def hf_to_megatron_layer(hf: dict[str, torch.Tensor], layouts: dict[str, FusedLayout],
                         norms: dict = LAYER_NORMS, sparse: SparseMLP | None = None) -> dict[str, torch.Tensor]:
    """One layer: HF names (relative to the layer) -> megatron names, global layout. The
    family's extra tensors (q/k/v biases, q/k norms) are converted when present; a sparse
    layer's ``layouts`` hold no dense MLP, its experts come from ``sparse``."""
    copies = {**norms, **{n: m for n, m in QK_NORMS.items() if n in hf}}
    out = {meg: hf[name] for name, meg in copies.items()}
    for module, layout in layouts.items():
        out[f"{module}.weight"] = layout.fuse({p: hf[PROJECTIONS[p].hf_weight] for p, _ in layout.pieces})
    if hf_bias("q_proj") in hf:
        out[f"{QKV_BIAS_MODULE}.bias"] = layouts[QKV_BIAS_MODULE].fuse({p: hf[hf_bias(p)] for p in QKV_BIASES})
    if sparse is not None:
        out.update(sparse.to_megatron(hf))
    return out


def megatron_to_hf_layer(meg: dict[str, torch.Tensor], layouts: dict[str, FusedLayout],
                         norms: dict = LAYER_NORMS, sparse: SparseMLP | None = None) -> dict[str, torch.Tensor]:
    """The exact inverse of ``hf_to_megatron_layer``."""
    copies = {**norms, **{n: m for n, m in QK_NORMS.items() if m in meg}}
    out = {name: meg[m] for name, m in copies.items()}
    for module, layout in layouts.items():
        for p, tensor in layout.unfuse(meg[f"{module}.weight"]).items():
            out[PROJECTIONS[p].hf_weight] = tensor
    if f"{QKV_BIAS_MODULE}.bias" in meg:
        for p, tensor in layouts[QKV_BIAS_MODULE].unfuse(meg[f"{QKV_BIAS_MODULE}.bias"]).items():
            out[hf_bias(p)] = tensor
    if sparse is not None:
        out.update(sparse.to_hf(meg))
    return out


def layout_of(megatron_name: str, layouts: dict[str, FusedLayout]) -> FusedLayout | None:
    """The layout of a megatron layer tensor ("decoder.layers.3.mlp.linear_fc1.weight"), or
    None for the tensors every TP rank holds whole (norms)."""
    module = megatron_name.rsplit(".", 1)[0]
    for path, layout in layouts.items():
        if module.endswith(path):
            return layout
    return None
