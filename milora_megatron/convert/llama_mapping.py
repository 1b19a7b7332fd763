"""HF Llama tensor names and layouts <-> megatron's, in megatron's *global* layout.

The global layout is the one every TP size slices contiguously (it is also what
megatron-core's distributed checkpoints store): ``linear_qkv`` as query groups one after
another, each ``[q heads; k; v]``; ``linear_fc1`` as ``[gate; up]``. A rank's shard is then
a row block (qkv), two row blocks (fc1), or a column block (proj, fc2): see ``tp_slices``.
"""

from __future__ import annotations

import torch

from .layout import qkv_shard

EMBEDDING = ("model.embed_tokens.weight", "embedding.word_embeddings.weight")
FINAL_NORM = ("model.norm.weight", "decoder.final_layernorm.weight")
LM_HEAD = ("lm_head.weight", "output_layer.weight")

# HF name inside a layer -> megatron name inside a layer, for the 1:1 tensors.
LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
FC1 = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
HF_LAYER_NAMES = (*LAYER_DIRECT, *QKV, *FC1)
MEGATRON_LAYER_NAMES = (*LAYER_DIRECT.values(), "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight")


def hf_layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def megatron_layer_prefix(i: int) -> str:
    return f"decoder.layers.{i}."


def hf_to_megatron_layer(hf: dict[str, torch.Tensor], heads: int, groups: int) -> dict[str, torch.Tensor]:
    """One layer: HF names (relative to the layer) -> megatron names, global layout."""
    out = {LAYER_DIRECT[k]: hf[k] for k in LAYER_DIRECT}
    q, k, v = (hf[n] for n in QKV)
    out["self_attention.linear_qkv.weight"] = qkv_shard(q, k, v, heads, groups, tp=1, rank=0)
    out["mlp.linear_fc1.weight"] = torch.cat([hf[FC1[0]], hf[FC1[1]]])
    return out


def megatron_to_hf_layer(meg: dict[str, torch.Tensor], heads: int, groups: int, head_dim: int) -> dict[str, torch.Tensor]:
    """The exact inverse of ``hf_to_megatron_layer``."""
    out = {k: meg[v] for k, v in LAYER_DIRECT.items()}
    qkv = meg["self_attention.linear_qkv.weight"]
    per = heads // groups
    grouped = qkv.view(groups, per + 2, head_dim, qkv.shape[-1])
    out[QKV[0]] = grouped[:, :per].reshape(heads * head_dim, -1).clone()
    out[QKV[1]] = grouped[:, per].reshape(groups * head_dim, -1).clone()
    out[QKV[2]] = grouped[:, per + 1].reshape(groups * head_dim, -1).clone()
    gate, up = meg["mlp.linear_fc1.weight"].chunk(2)
    out[FC1[0]], out[FC1[1]] = gate.clone(), up.clone()
    return out


def tp_slices(name: str, shape: tuple[int, ...], tp: int, rank: int):
    """Index expressions (one per contiguous block, concatenated on dim 0) giving this TP
    rank's shard of a global megatron tensor; vocabulary rows are handled by the loader."""
    if name.endswith("linear_qkv.weight"):
        n = shape[0] // tp
        return [(slice(rank * n, (rank + 1) * n),)]
    if name.endswith("linear_fc1.weight"):
        half = shape[0] // 2
        n = half // tp
        return [(slice(rank * n, (rank + 1) * n),), (slice(half + rank * n, half + (rank + 1) * n),)]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        n = shape[1] // tp
        return [(slice(None), slice(rank * n, (rank + 1) * n))]
    return [(slice(None),) * len(shape)]  # norms: replicated
