"""Torch-native pieces for megatron-core's local layer spec: SDPA core attention and an
RMSNorm that works under sequence parallelism. Neither needs transformer-engine or apex.

megatron-core's local ``DotProductAttention`` materialises the full [b, heads, s, s] score
tensor in fp32 (out of memory at Llama-3-8B shape, see the platform notes) and its
``WrappedTorchNorm`` refuses sequence parallelism; these replace exactly those two.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class RMSNorm(torch.nn.Module):
    """Llama's RMSNorm as HF defines it (fp32 statistics, cast back, then scale), in one fused
    op: ``torch.nn.functional.rms_norm`` accumulates in fp32 for bf16/fp16 inputs and, on a
    GPU, runs one kernel forward and one backward instead of several elementwise passes
    with an fp32 copy of the activations. On the CPU it equals HF's form bit for bit in fp32
    and bf16 (tests/unit/test_layers.py).

    It is per token, so under sequence parallelism each rank normalises its own chunk; the
    weight is marked ``sequence_parallel`` so megatron all-reduces its gradient if trained.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class SDPAttention(MegatronModule):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Takes megatron's [s, b, heads, dim] query and [s, b, groups, dim] key/value (GQA is
    handled by SDPA, no repeat), returns [s, b, heads * dim] like ``DotProductAttention``.
    Without a mask tensor a causal layer takes SDPA's own causal path (flash / memory-efficient
    kernels on GPU, no s x s mask in memory); packed samples pass a mask that also keeps
    each example to itself.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by the SDPA core attention")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        # an explicit mask (packed examples) replaces the causal shortcut; it includes causality
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None if attention_mask is None else ~attention_mask  # megatron: True = masked
        dropout = self.dropout if self.training else 0.0
        # heads are split over TP ranks: each needs its own dropout stream, as in megatron
        rng = get_cuda_rng_tracker().fork() if dropout > 0.0 else contextlib.nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def local_layer_spec(qk_norm: bool = False):
    """megatron-core's local GPT layer spec with the two modules above swapped in (``qk_norm``:
    Qwen3's per-head RMSNorm on q and k, our RMSNorm over the head dimension)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_norm)
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if qk_norm:
        spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec

