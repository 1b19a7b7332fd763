"""Tiny Llama-shaped weights with decaying spectra, and megatron models built from them."""

from __future__ import annotations

import torch

SHAPE = dict(layers=2, hidden=64, heads=8, groups=4, ffn=96, vocab=128)


def spectral_matrix(out: int, inp: int, cond: float, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Random singular vectors, log-spaced singular values from 1 down to 1/cond."""
    n = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, n, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), n, dtype=torch.float64)
    return ((u * s) @ v.t()).to(dtype)


def hf_layer_weights(seed: int = 0, cond: float = 1e3, **shape) -> list[dict[str, torch.Tensor]]:
    s = {**SHAPE, **shape}
    gen = torch.Generator().manual_seed(seed)
    hd = s["hidden"] // s["heads"]
    dims = {
        "q_proj": (s["heads"] * hd, s["hidden"]),
        "k_proj": (s["groups"] * hd, s["hidden"]),
        "v_proj": (s["groups"] * hd, s["hidden"]),
        "o_proj": (s["hidden"], s["heads"] * hd),
        "gate_proj": (s["ffn"], s["hidden"]),
        "up_proj": (s["ffn"], s["hidden"]),
        "down_proj": (s["hidden"], s["ffn"]),
    }
    return [{k: spectral_matrix(*d, cond, gen) for k, d in dims.items()} for _ in range(s["layers"])]


def transformer_config(tp: int = 1, pp: int = 1, sp: bool = False, dtype=torch.float32, **shape):
    from milora_megatron.models.decoder import DecoderShape
    from milora_megatron.models.decoder import transformer_config as make

    s = {**SHAPE, **shape}
    return make(DecoderShape(layers=s["layers"], hidden=s["hidden"], heads=s["heads"], kv_heads=s["groups"],
                           ffn=s["ffn"], vocab=s["vocab"]), tp=tp, pp=pp, sp=sp, dtype=dtype)


def layouts():
    """The tiny shape's decoder-layer layouts (global), from the package's mapping."""
    from milora_megatron.mapping import layer_layouts

    hd = SHAPE["hidden"] // SHAPE["heads"]
    return layer_layouts(SHAPE["heads"], SHAPE["groups"], hd, SHAPE["ffn"], SHAPE["hidden"])


def shard(layout, weights: dict[str, torch.Tensor], tp: int, rank: int) -> torch.Tensor:
    """This TP rank's shard of the fused weight built from HF matrices ``weights``."""
    return layout.shard(layout.fuse({p: weights[p] for p, _ in layout.pieces}), tp, rank)


def build_gpt(weights, tp: int, sp: bool = False, pp: int = 1, dtype=torch.float32):
    """A GPTModel (local spec) on this rank with ``weights`` loaded into its TP shards."""
    from megatron.core import parallel_state as ps

    from milora_megatron.models.decoder import DecoderShape
    from milora_megatron.models.decoder import build_gpt as build

    cfg = transformer_config(tp=tp, sp=sp, pp=pp, dtype=dtype, layers=len(weights))
    shape = DecoderShape(layers=len(weights), hidden=SHAPE["hidden"], heads=SHAPE["heads"], kv_heads=SHAPE["groups"],
                       ffn=SHAPE["ffn"], vocab=SHAPE["vocab"])
    model = build(shape, cfg)
    rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for layer in model.decoder.layers:
            w = weights[layer.layer_number - 1]
            for path, layout in layouts().items():
                layer.get_submodule(path).weight.copy_(shard(layout, w, tp, rank))
    return model


def causal_mask(seq: int) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocab logits (gathered over TP), [batch, seq, vocab]."""
    from milora_megatron.models.decoder import gather_logits

    seq = tokens.shape[1]
    pos = torch.arange(seq).unsqueeze(0).expand_as(tokens)
    return gather_logits(model, model(tokens, pos, causal_mask(seq)))
