"""Decoders (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3: models/families/) as megatron-core
GPTModels, from an HF config.

``DecoderShape`` is everything a family reads from its ``config.json``; the family module
fills it, and nothing here names a family. What the config says and megatron has no flag
for is handled here: rope scaling (the inverse frequencies come from transformers itself),
a second rope base for windowed layers, the embedding scale, tied embeddings, and the
vocabulary padding to a multiple of 128 x TP, which stays invisible: padded rows are zero
and their logits are masked to the dtype's minimum, so softmax and loss see exactly the
real vocabulary.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import CheckpointError, ConfigError
from ..mapping.decoder import DENSE_MLP, LAYER_NORMS, hf_layer_shapes, layer_layouts
from ..mapping.experts import ExpertNames, SparseMLP

VOCAB_PAD_MULTIPLE = 128
ACTIVATIONS = {"silu": torch.nn.functional.silu,
               "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh")}
Recompute = Literal["none", "selective", "full"]
RECOMPUTE = typing.get_args(Recompute)


@dataclass
class DecoderShape:
    layers: int = 2
    hidden: int = 64
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 96
    vocab: int = 128
    head_dim: int | None = None  # None: hidden // heads
    max_seq: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope parameters ("llama3", "linear"); of the full-attention layers
    rms_eps: float = 1e-5
    tied: bool = False
    family: str = "llama"  # models/families/: the module that filled this shape
    qkv_bias: bool = False
    qk_norm: bool = False
    # HF layer norm -> megatron name (mapping/decoder.py); a family with other norms declares its own
    norms: dict = field(default_factory=lambda: dict(LAYER_NORMS))
    zero_centered_norms: bool = False  # every RMSNorm scales by (1 + w), in fp32 (Gemma)
    activation: str = "silu"  # of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embedding_scale: float | None = None  # the embedding output times this, in the model's dtype
    softmax_scale: float | None = None  # None: 1 / sqrt(head_dim)
    sliding_window: int | None = None  # None: full attention
    # per layer "sliding_attention" or "full_attention"; empty: every layer windowed if
    # sliding_window is set (Mistral)
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # the windowed layers' own rope base (Gemma 3)
    # mixture of experts (Qwen3-MoE, Mixtral); experts 0: a dense model
    experts: int = 0
    experts_topk: int = 0
    moe_ffn: int | None = None  # each expert's intermediate size
    norm_topk: bool = True  # the top-k routing probabilities renormalised to sum to 1
    dense_layers: tuple[int, ...] = ()  # in an MoE model, the layers whose MLP is dense
    expert_names: ExpertNames = field(default_factory=ExpertNames)  # the family's on-disk names
    hf_config: dict = field(default_factory=dict, repr=False)

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def window(self, layer: int) -> int | None:
        """How far layer ``layer`` (0-based) attends back, None for full causal attention."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return None
        return self.sliding_window

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "DecoderShape":
        """Validate an HF ``config.json`` (as a dict) and read the shape from it (models.families)."""
        from .families import family_for

        return cls(**family_for(cfg).read(cfg), hf_config=dict(cfg))

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len > self.max_seq:
            raise ConfigError(f"train.seq_len {seq_len} exceeds the model's max_position_embeddings {self.max_seq}")

    def sparse(self, layer: int) -> SparseMLP | None:
        """Layer ``layer``'s experts (0-based, global), None where its MLP is dense."""
        if not self.experts or layer in self.dense_layers:
            return None
        return SparseMLP(self.experts, self.moe_ffn, self.hidden, self.expert_names)

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.layers) if self.sparse(i) is not None)

    def layer_layouts(self, layer: int | None = None) -> dict:
        """Each decoder-layer linear's fused layout (mapping.decoder.layer_layouts); a sparse
        ``layer`` has no dense MLP (its experts' layouts: ``sparse(layer).layouts()``)."""
        layouts = layer_layouts(self.heads, self.kv_heads, self.kv_channels, self.ffn, self.hidden)
        if layer is not None and self.sparse(layer) is not None:
            return {m: layout for m, layout in layouts.items() if m not in DENSE_MLP}
        return layouts

    def layer_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Every HF tensor of decoder layer ``layer`` with its shape (names relative to the layer)."""
        return hf_layer_shapes(self.heads, self.kv_heads, self.kv_channels, self.ffn, self.hidden,
                               qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, norms=self.norms,
                               sparse=self.sparse(layer))

    def check_parallel(self, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> None:
        """``ep``/``etp``: expert-parallel and expert-tensor-parallel sizes (``etp`` None: ``tp``)."""
        sizes = [(self.heads, "attention heads"), (self.kv_heads, "KV heads (query groups)")]
        if self.has_dense_mlp:  # an all-sparse model (Mixtral) has no dense FFN to split
            sizes.append((self.ffn, "FFN size (intermediate_size)"))
        for n, what in sizes:
            if n % tp:
                raise ConfigError(f"TP size {tp} does not divide the {n} {what}")
        if self.layers % pp:
            raise ConfigError(f"PP size {pp} does not divide the {self.layers} layers")
        etp = tp if etp is None else etp
        if not self.experts:
            if ep != 1 or etp != tp:
                raise ConfigError(f"expert parallelism (ep={ep}, etp={etp}) needs a mixture-of-experts model; "
                                  f"this {self.family} model is dense: leave parallel.ep and parallel.etp unset")
            return
        if ep < 1 or self.experts % ep:
            raise ConfigError(f"EP size {ep} does not divide the {self.experts} experts")
        if etp < 1 or self.moe_ffn % etp:
            raise ConfigError(f"expert TP size {etp} does not divide the experts' FFN size {self.moe_ffn} "
                              "(moe_intermediate_size)")

    @property
    def has_dense_mlp(self) -> bool:
        return len(self.sparse_layers) < self.layers


def padded_vocab(vocab: int, tp: int) -> int:
    multiple = VOCAB_PAD_MULTIPLE * tp
    return -(-vocab // multiple) * multiple


def _recompute_settings(recompute: str) -> dict:
    """megatron's own activation-recompute settings for ``train.recompute``."""
    if recompute == "selective":  # megatron's default selective set: the core attention
        return {"recompute_granularity": "selective"}
    if recompute == "full":  # every layer's input kept, the layer recomputed in backward
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if recompute != "none":
        raise ConfigError(f"recompute must be one of {list(RECOMPUTE)}, got {recompute!r}")
    return {}


def _moe_settings(shape: DecoderShape, ep: int, etp: int | None) -> dict:
    """megatron's MoE settings for an MoE shape: transformers' routing exactly (softmax over
    every expert, top-k, renormalised when the family says so), dropless (no capacity: every
    token reaches its k experts, as in transformers), the router frozen and so no
    load-balancing loss, experts as one dense MLP each (``SequentialMLP``: adaptable
    Column/RowParallelLinears) behind the all-to-all token dispatcher."""
    if not shape.experts:
        return {}
    return dict(num_moe_experts=shape.experts, moe_router_topk=shape.experts_topk, moe_ffn_hidden_size=shape.moe_ffn,
                # top-k of the logits then a softmax over the k == softmax, top-k, renormalise
                moe_router_pre_softmax=not shape.norm_topk, moe_router_score_function="softmax",
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
                moe_expert_capacity_factor=None, moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
                moe_permute_fusion=False, moe_router_fusion=False,
                expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)


def transformer_config(shape: DecoderShape, tp: int = 1, pp: int = 1, sp: bool = False,
                       dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                       recompute: str = "none", perform_initialization: bool = True, ep: int = 1,
                       etp: int | None = None):
    """megatron's TransformerConfig for ``shape``. ``perform_initialization=False`` when every
    weight is loaded afterwards (the random init of 8B parameters would be thrown away).
    ``ep``/``etp``: expert-parallel and expert-tensor-parallel sizes of an MoE model (``etp``
    None: megatron's default, ``tp``)."""
    from megatron.core.transformer import TransformerConfig

    shape.check_parallel(tp, pp, ep, etp)
    if sp and tp == 1:
        sp = False  # nothing to split
    return TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads, ffn_hidden_size=shape.ffn, kv_channels=shape.kv_channels,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
        gated_linear_unit=True, activation_func=ACTIVATIONS[shape.activation], add_bias_linear=False, add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm, normalization="RMSNorm", softmax_scale=shape.softmax_scale,
        layernorm_epsilon=shape.rms_eps, use_cpu_initialization=torch.device(device).type == "cpu",
        perform_initialization=perform_initialization,
        gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype,
        pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        # megatron's fused SwiGLU (no transformer-engine needed: a compiled kernel that keeps
        # the fc1 output, not silu's intermediate, for backward) on a GPU; on the CPU the plain
        # one, which the tests' references use (forward equal in fp32, backward to rounding)
        bias_activation_fusion=torch.device(device).type == "cuda" and shape.activation == "silu",
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, **_recompute_settings(recompute), **_moe_settings(shape, ep, etp),
    )


def rope_inv_freq(shape: DecoderShape, local: bool = False) -> torch.Tensor:
    """The rotary inverse frequencies exactly as transformers computes them for this config
    (``local``: the windowed layers' own base, unscaled, as Gemma 3 has it)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "default"} if local else dict(shape.rope_scaling or {"rope_type": "default"})
    rope["rope_theta"] = shape.local_rope_theta if local else shape.rope_theta
    cfg = LlamaConfig(hidden_size=shape.hidden, num_attention_heads=shape.heads, head_dim=shape.kv_channels,
                      max_position_embeddings=max(shape.max_seq, rope.get("original_max_position_embeddings", 0)),
                      rope_parameters=rope)
    emb = LlamaRotaryEmbedding(cfg)
    if getattr(emb, "attention_scaling", 1.0) != 1.0:
        raise CheckpointError(f"rope attention scaling {emb.attention_scaling} is not supported")
    return emb.inv_freq.to(torch.float32)


def build_gpt(shape: DecoderShape, config):
    """This pipeline stage's GPTModel on megatron's local spec with our SDPA attention and
    RMSNorm (models/layers.py). With full recompute, the first stage's embedding output
    requires grad: the embedding is frozen, and a recomputed layer whose inputs need no
    grad would pass none back to the adapters inside it."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from .layers import decoder_layer_spec, norm_class

    first = get_transformer_layer_offset(config)
    local_freq = rope_inv_freq(shape, local=True) if shape.local_rope_theta is not None else None
    specs = [decoder_layer_spec(shape, config, layer, local_freq) for layer in
             range(first, first + get_num_layers_to_build(config))]
    block = TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm_class(shape))
    tp = config.tensor_model_parallel_size
    model = GPTModel(
        config=config, transformer_layer_spec=block, vocab_size=padded_vocab(shape.vocab, tp),
        max_sequence_length=shape.max_seq, position_embedding_type="rope", rotary_base=int(shape.rope_theta),
        share_embeddings_and_output_weights=shape.tied, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    with torch.no_grad():  # in place: megatron keeps inv_freq as a plain attribute
        model.rotary_pos_emb.inv_freq.copy_(rope_inv_freq(shape))
    model.rotary_pos_emb.forward.cache_clear()
    if model.post_process:
        _mask_padded_logits(model, shape.vocab, ps.get_tensor_model_parallel_rank())
    if model.pre_process and shape.embedding_scale is not None:
        _scale_embeddings(model, shape.embedding_scale)
    if model.pre_process and config.recompute_granularity == "full":
        model.embedding.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True) if out.is_leaf else out)
    model.decoder_shape = shape
    return model


def _scale_embeddings(model, scale: float) -> None:
    """The word embeddings times ``scale`` rounded to the weights' dtype, as Gemma does it."""

    def hook(module, _inputs, output):
        return output * torch.tensor(scale, dtype=torch.float32).to(module.weight.dtype)

    model.embedding.word_embeddings.register_forward_hook(hook)


def _mask_padded_logits(model, vocab: int, tp_rank: int) -> None:
    """Padded vocabulary columns of this rank's logits shard get the dtype's minimum."""

    def hook(_module, _inputs, output):
        logits, bias = output
        local = logits.shape[-1]
        start = tp_rank * local
        if start + local <= vocab:
            return output
        keep = (torch.arange(start, start + local, device=logits.device) < vocab)
        return logits.masked_fill(~keep, torch.finfo(logits.dtype).min), bias

    model.output_layer.register_forward_hook(hook)


def gather_logits(model, output: torch.Tensor) -> torch.Tensor:
    """Full, unpadded logits [batch, seq, vocab] from a last stage's TP-sharded output."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(output)[..., : model.decoder_shape.vocab]
