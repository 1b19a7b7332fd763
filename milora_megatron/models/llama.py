"""A Llama-shaped megatron-core GPTModel on the torch-native local spec (no TE, no apex).

Only explicit shapes for now; building from an HF ``config.json`` (rope scaling, tied
embeddings, vocabulary padding) is the converter issue's work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LlamaShape:
    layers: int = 2
    hidden: int = 64
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 96
    vocab: int = 128
    max_seq: int = 256
    rope_theta: float = 10000.0


def transformer_config(shape: LlamaShape, tp: int = 1, pp: int = 1, sp: bool = False,
                       dtype: torch.dtype = torch.float32):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    if shape.heads % tp or shape.kv_heads % tp:
        raise ValueError(f"TP size {tp} must divide the attention heads ({shape.heads}) and KV heads ({shape.kv_heads})")
    if shape.layers % pp:
        raise ValueError(f"PP size {pp} does not divide the {shape.layers} layers")
    return TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads, ffn_hidden_size=shape.ffn, kv_channels=shape.hidden // shape.heads,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
        use_cpu_initialization=not torch.cuda.is_available(), gradient_accumulation_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False,
    )


def build_gpt(shape: LlamaShape, config):
    """This pipeline stage's GPTModel."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=shape.vocab, max_sequence_length=shape.max_seq, position_embedding_type="rope",
        rotary_base=int(shape.rope_theta), pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
