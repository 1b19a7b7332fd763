"""Each family reads its own transformers config; what the shared GPT layer cannot do is
refused with the key that asks for it."""

import re

import pytest

from milora_megatron.errors import CheckpointError, ConfigError
from milora_megatron.models.families import family_for
from milora_megatron.models.decoder import DecoderShape
from milora_megatron.models.tiny_hf import FAMILIES, family_config


def _cfg(family, **changes):
    return {**family_config(family).to_dict(), **changes}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_reads_its_transformers_config(family, tmp_path):
    """Every registered family: the shape read from its tiny config names exactly the
    tensors, with their shapes, that transformers' own model of that config writes to disk
    (``save_pretrained``: experts one tensor each, as the Hub stores them)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = family_config(family)
    shape = DecoderShape.from_hf_config(config.to_dict())
    assert family_for(config.to_dict()).name == shape.family == family
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        on_disk = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}."
        held = {n[len(prefix):]: s for n, s in on_disk.items() if n.startswith(prefix)}
        assert shape.layer_shapes(layer) == held
    assert shape.tied == model.config.tie_word_embeddings
    assert all(shape.window(i) in (None, shape.sliding_window) for i in range(shape.layers))


def test_what_sets_each_family_apart_is_read():
    shapes = {f: DecoderShape.from_hf_config(_cfg(f)) for f in FAMILIES}
    assert [f for f, s in shapes.items() if s.qkv_bias] == ["qwen2"]
    assert sorted(f for f, s in shapes.items() if s.qk_norm) == ["gemma3", "qwen3", "qwen3_moe"]
    assert shapes["qwen3"].kv_channels == 32 and shapes["llama"].kv_channels == 16  # head_dim != hidden / heads
    assert [shapes["mistral"].window(i) for i in range(4)] == [8] * 4
    gemma = shapes["gemma3"]
    assert [gemma.window(i) for i in range(4)] == [8, None, 8, None]
    assert gemma.local_rope_theta == 1e4 and gemma.rope_theta == 1e6 and gemma.rope_scaling["rope_type"] == "linear"
    assert gemma.zero_centered_norms and gemma.activation == "gelu_tanh" and gemma.tied
    assert gemma.embedding_scale == 8.0 and gemma.softmax_scale == 24 ** -0.5
    assert "pre_feedforward_layernorm.weight" in gemma.norms and len(gemma.norms) == 4
    assert sorted(f for f, s in shapes.items() if s.experts) == ["mixtral", "qwen3_moe"]
    qwen, mixtral = shapes["qwen3_moe"], shapes["mixtral"]
    assert qwen.sparse_layers == (1, 2, 3) and qwen.has_dense_mlp and not qwen.norm_topk  # mlp_only_layers [0]
    assert (qwen.experts, qwen.experts_topk, qwen.moe_ffn, qwen.ffn) == (4, 2, 32, 96)
    assert mixtral.sparse_layers == (0, 1, 2, 3) and not mixtral.has_dense_mlp and mixtral.norm_topk
    assert "block_sparse_moe.experts.3.w2.weight" in mixtral.layer_shapes(0)


def test_qwen3_moe_sparse_layers_follow_transformers():
    """decoder_sparse_step and mlp_only_layers pick the sparse layers as transformers does."""
    from transformers import Qwen3MoeForCausalLM

    config = family_config("qwen3_moe", layers=6, dense_layers=(4,))
    config.decoder_sparse_step = 2
    shape = DecoderShape.from_hf_config(config.to_dict())
    model = Qwen3MoeForCausalLM(config)
    sparse = tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
    assert shape.sparse_layers == sparse == (1, 3, 5)


@pytest.mark.parametrize("family,changes,message", [
    ("qwen3_moe", {"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size=64 (shared experts"),
    ("qwen3_moe", {"kv_lora_rank": 16}, "kv_lora_rank=16 (MLA attention is not supported)"),
    ("mixtral", {"topk_method": "noaux_tc"}, "topk_method='noaux_tc' (expert-bias routing is not supported)"),
    ("mixtral", {"router_jitter_noise": 0.1}, "unsupported mixtral config: router_jitter_noise=0.1"),
    ("qwen3_moe", {"num_experts_per_tok": 8}, "8 experts per token but only 4 experts"),
])
def test_moe_refusals_name_the_key(family, changes, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        DecoderShape.from_hf_config(_cfg(family, **changes))


def test_expert_parallel_sizes_are_checked():
    qwen = DecoderShape.from_hf_config(_cfg("qwen3_moe"))
    qwen.check_parallel(tp=2, pp=2, ep=4, etp=2)
    with pytest.raises(ConfigError, match="EP size 3 does not divide the 4 experts"):
        qwen.check_parallel(tp=1, pp=1, ep=3)
    with pytest.raises(ConfigError, match="expert TP size 3 does not divide the experts' FFN size 32"):
        qwen.check_parallel(tp=1, pp=1, ep=1, etp=3)
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model"):
        DecoderShape.from_hf_config(_cfg("llama")).check_parallel(tp=1, pp=1, ep=2)


def test_gemma3_reads_the_hubs_older_keys_as_transformers_does():
    """Gemma 3 checkpoints on the Hub name the local rope base and the layer pattern with
    the older keys; they mean what they mean to transformers."""
    cfg = {k: v for k, v in _cfg("gemma3").items() if k not in ("rope_parameters", "layer_types")}
    cfg.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
               sliding_window_pattern=2)
    shape = DecoderShape.from_hf_config(cfg)
    assert shape.layer_types == ("sliding_attention", "full_attention") * 2
    assert shape.local_rope_theta == 1e4 and shape.rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("family,changes,message", [
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=true"),
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types ['full_attention', 'sliding_attention']"),
    ("qwen3", {"attention_bias": True}, "unsupported qwen3 config: attention_bias=True"),
    ("mistral", {"hidden_act": "gelu"}, "unsupported mistral config: hidden_act='gelu'"),
    ("llama", {"attention_bias": True}, "unsupported llama config: attention_bias=True"),
    ("llama", {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "unsupported architecture ['Gemma2ForCausalLM']"),
    ("gemma3", {"final_logit_softcapping": 30.0}, "unsupported gemma3 config: final_logit_softcapping=30.0"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "unsupported gemma3 config: attn_logit_softcapping=50.0"),
    ("gemma3", {"hidden_activation": "gelu"}, "unsupported gemma3 config: hidden_activation='gelu'"),
    ("gemma3", {"use_bidirectional_attention": True}, "unsupported gemma3 config: use_bidirectional_attention=True"),
    ("llama", {"architectures": ["Qwen2ForCausalLM"]}, "unsupported architecture"),  # model_type and class disagree
    ("qwen3", {"num_attention_heads": None}, "qwen3 config: num_attention_heads=None is not a positive integer"),
    ("llama", {"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
])
def test_refusals_name_the_key(family, changes, message):
    """A config we cannot handle is the checkpoint's (the user's) problem: a CheckpointError,
    still a ValueError for older callers."""
    with pytest.raises(CheckpointError) as info:
        DecoderShape.from_hf_config(_cfg(family, **changes))
    assert message in str(info.value) and isinstance(info.value, ValueError)


def test_a_config_without_a_size_is_refused_not_a_key_error():
    cfg = _cfg("llama")
    del cfg["intermediate_size"]
    with pytest.raises(CheckpointError, match="llama config has no intermediate_size"):
        DecoderShape.from_hf_config(cfg)


def test_a_sliding_window_shorter_than_the_sequences_is_not_refused():
    shape = DecoderShape.from_hf_config(_cfg("mistral", sliding_window=128))
    shape.check_seq_len(256)  # the window is attention's, not a limit on the sequence
    with pytest.raises(ConfigError, match="train.seq_len 512 exceeds the model's max_position_embeddings 256"):
        shape.check_seq_len(512)
    with pytest.raises(ConfigError, match="TP size 3 does not divide the 4 attention heads"):
        shape.check_parallel(3, 1)
    assert DecoderShape.from_hf_config(_cfg("mistral", sliding_window=None)).window(0) is None
