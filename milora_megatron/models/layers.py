"""Torch-native pieces for megatron-core's local layer spec: SDPA core attention (with a
sliding window where the layer has one) and an RMSNorm that works under sequence
parallelism, neither needing transformer-engine or apex; and what a family's layer adds
to megatron's: Gemma's (1 + w) norms, norms on the sublayer outputs, a second rope base.

megatron-core's local ``DotProductAttention`` materialises the full [b, heads, s, s] score
tensor in fp32 (out of memory at Llama-3-8B shape, see the platform notes) and its
``WrappedTorchNorm`` refuses sequence parallelism; these replace exactly those two.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.attention import SelfAttention
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


class ZeroCenteredRMSNorm(RMSNorm):
    """Gemma's RMSNorm: normalised and scaled by ``1 + w`` in fp32, then cast back (HF's
    order; Llama casts before scaling). Its identity weight is zero."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__(config, hidden_size, eps)
        torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1.0 + self.weight.float())).type_as(x)


class NormedResidualAdd(torch.nn.Module):
    """A bias-dropout-add that normalises the sublayer's output before the residual add
    (Gemma's post-attention and post-feedforward norms). It takes the place of megatron's
    ``self_attn_bda`` / ``mlp_bda``, so the layer's own forward stays megatron's."""

    def __init__(self, config, hidden_size: int, eps: float, norm: type[RMSNorm] = RMSNorm):
        super().__init__()
        self.norm = norm(config, hidden_size, eps=eps)

    def forward(self, training: bool, _fused: bool):
        def add(x_with_bias, residual, dropout: float):
            x, bias = x_with_bias
            x = self.norm(x if bias is None else x + bias)
            return residual + F.dropout(x, p=dropout, training=training)

        return add


class LocalRopeSelfAttention(SelfAttention):
    """Self-attention with its own rotary base (Gemma 3's windowed layers): the model passes
    every layer the global layers' rope; this one uses its own over the same positions."""

    def __init__(self, *args, rope_inv_freq: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        self.local_rotary_pos_emb = RotaryEmbedding(
            kv_channels=self.config.kv_channels, rotary_percent=1.0,
            use_cpu_initialization=self.config.use_cpu_initialization)
        with torch.no_grad():  # in place, as for the model's own (models/decoder.py)
            self.local_rotary_pos_emb.inv_freq.copy_(rope_inv_freq)
        self.local_rotary_pos_emb.forward.cache_clear()

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if rotary_pos_emb is not None:
            seq = (rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb).shape[0]
            rotary_pos_emb = self.local_rotary_pos_emb(seq)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


@functools.lru_cache(maxsize=8)
def _window_band(seq: int, window: int, device: torch.device) -> torch.Tensor:
    """[s, s], True where a query may NOT look: the future, or ``window`` or more positions
    back (transformers' sliding window: key j is seen from query i iff i - window < j <= i)."""
    ones = torch.ones(seq, seq, dtype=torch.bool, device=device)
    return ones.triu(1) | ones.tril(-window)


class _AllowedMask:
    """The boolean mask SDPA takes (True = may attend) for one micro-batch's megatron mask
    (True = masked) and one window, built once and shared by every layer that asks for the
    same pair: one s x s boolean per micro-batch and window, whatever the number of layers.
    It holds the latest pair only, so nothing outlives the next micro-batch."""

    def __init__(self):
        self.key, self.value = None, None

    def __call__(self, masked: torch.Tensor | None, window: int | None, seq: int, device) -> torch.Tensor:
        key = (masked, window, seq, device)
        if self.key is not None and self.key[0] is masked and self.key[1:] == key[1:]:
            return self.value
        if window is not None and window < seq:
            band = _window_band(seq, window, device)
            masked = band if masked is None else masked | band
        self.key, self.value = key, ~masked
        return self.value


allowed_mask = _AllowedMask()


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
                 cp_comm_type: str | None = None, pg_collection=None, window: int | None = None):
        super().__init__(config=config)
        self.window = window  # None: full causal attention
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
        # an explicit mask (packed examples, a window) replaces the causal shortcut; it includes causality
        seq = q.shape[2]
        windowed = self.window is not None and self.window < seq
        explicit = attention_mask is not None or windowed
        causal = mask_type == AttnMaskType.causal and not explicit
        mask = allowed_mask(attention_mask, self.window if windowed else None, seq, q.device) if explicit else None
        dropout = self.dropout if self.training else 0.0
        # heads are split over TP ranks: each needs its own dropout stream, as in megatron
        rng = get_cuda_rng_tracker().fork() if dropout > 0.0 else contextlib.nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def norm_class(shape) -> type[RMSNorm]:
    return ZeroCenteredRMSNorm if shape.zero_centered_norms else RMSNorm


def decoder_layer_spec(shape, config, layer: int, local_rope_inv_freq: torch.Tensor | None = None):
    """Layer ``layer`` (0-based, global) of ``shape`` (models/decoder.py) on megatron-core's
    local GPT layer spec, with the modules above swapped in: our norms (also on q and k with
    ``qk_norm``), SDPA with the layer's window, the windowed layers' own rope where the
    family has one, norms on the sublayer outputs where the family's norm table has
    them (mapping/decoder.py: POST_ATTENTION_NORM, POST_MLP_NORM), and megatron's own MoE
    layer where the layer is sparse (``shape.sparse``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from ..mapping.decoder import POST_ATTENTION_NORM, POST_MLP_NORM

    norm = norm_class(shape)
    # a sparse layer: megatron's MoELayer (router, all-to-all dispatcher, SequentialMLP experts)
    experts = shape.experts if shape.sparse(layer) is not None else None
    spec = get_gpt_layer_local_spec(num_experts=experts, normalization="RMSNorm", qk_layernorm=shape.qk_norm)
    layer_parts, attention = spec.submodules, spec.submodules.self_attention
    layer_parts.input_layernorm = layer_parts.pre_mlp_layernorm = norm
    if shape.qk_norm:
        attention.submodules.q_layernorm = attention.submodules.k_layernorm = norm
    window = shape.window(layer)
    attention.submodules.core_attention = ModuleSpec(SDPAttention, params={"window": window})
    if window is not None and local_rope_inv_freq is not None:
        attention.module = LocalRopeSelfAttention
        attention.params = {**attention.params, "rope_inv_freq": local_rope_inv_freq}
    post = dict(config=config, hidden_size=shape.hidden, eps=shape.rms_eps, norm=norm)
    if POST_ATTENTION_NORM in shape.norms.values():
        layer_parts.self_attn_bda = ModuleSpec(NormedResidualAdd, params=post)
    if POST_MLP_NORM in shape.norms.values():
        layer_parts.mlp_bda = ModuleSpec(NormedResidualAdd, params=post)
    return spec
