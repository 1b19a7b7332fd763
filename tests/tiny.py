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


def transformer_config(tp: int = 1, pp: int = 1, sp: bool = False, **shape):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    s = {**SHAPE, **shape}
    return TransformerConfig(
        num_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
        num_query_groups=s["groups"], ffn_hidden_size=s["ffn"], kv_channels=s["hidden"] // s["heads"],
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
        use_cpu_initialization=True, gradient_accumulation_fusion=False, hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=torch.float32, pipeline_dtype=torch.float32, bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
    )


def build_gpt(weights, tp: int, sp: bool = False, pp: int = 1):
    """A GPTModel (local spec) on this rank with ``weights`` loaded into its TP shards."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from milora_megatron.convert.layout import col_shard, fc1_shard, qkv_shard

    cfg = transformer_config(tp=tp, sp=sp, pp=pp, layers=len(weights))
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=SHAPE["vocab"], max_sequence_length=64, position_embedding_type="rope",
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for layer in model.decoder.layers:
            w = weights[layer.layer_number - 1]
            att, mlp = layer.self_attention, layer.mlp
            att.linear_qkv.weight.copy_(qkv_shard(w["q_proj"], w["k_proj"], w["v_proj"], cfg.num_attention_heads, cfg.num_query_groups, tp, rank))
            att.linear_proj.weight.copy_(col_shard(w["o_proj"], tp, rank))
            mlp.linear_fc1.weight.copy_(fc1_shard(w["gate_proj"], w["up_proj"], tp, rank))
            mlp.linear_fc2.weight.copy_(col_shard(w["down_proj"], tp, rank))
    return model


def causal_mask(seq: int) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocab logits (gathered over TP), [batch, seq, vocab]."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    seq = tokens.shape[1]
    pos = torch.arange(seq).unsqueeze(0).expand_as(tokens)
    out = model(tokens, pos, causal_mask(seq))
    return gather_from_tensor_model_parallel_region(out)
