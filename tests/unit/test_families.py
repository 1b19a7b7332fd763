"""Each family reads its own transformers config; what the shared GPT layer cannot do is
refused with the key that asks for it."""

import pytest

from milora_megatron.errors import CheckpointError, ConfigError
from milora_megatron.models.families import family_for
from milora_megatron.models.decoder import DecoderShape
from milora_megatron.models.tiny_hf import FAMILIES, family_config


def _cfg(family, **changes):
    return {**family_config(family).to_dict(), **changes}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_reads_its_transformers_config(family):
    shape = DecoderShape.from_hf_config(_cfg(family))
    assert family_for(_cfg(family)).name == shape.family == family
    assert shape.qkv_bias == (family == "qwen2") and shape.qk_norm == (family == "qwen3")
    assert shape.kv_channels == (32 if family == "qwen3" else 16)  # Qwen3: head_dim != hidden / heads
    assert shape.sliding_window == (4096 if family == "mistral" else None)
    layer = shape.layer_shapes()
    assert ("self_attn.q_proj.bias" in layer) == (family == "qwen2") and layer.get("self_attn.k_proj.bias", (32,)) == (32,)
    assert ("self_attn.q_norm.weight" in layer) == (family == "qwen3")


@pytest.mark.parametrize("family,changes,message", [
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=true"),
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types ['full_attention', 'sliding_attention']"),
    ("qwen3", {"attention_bias": True}, "unsupported qwen3 config: attention_bias=True"),
    ("mistral", {"hidden_act": "gelu"}, "unsupported mistral config: hidden_act='gelu'"),
    ("llama", {"attention_bias": True}, "unsupported llama config: attention_bias=True"),
    ("llama", {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "unsupported architecture ['Gemma2ForCausalLM']"),
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


def test_a_sliding_window_shorter_than_the_sequences_is_refused():
    shape = DecoderShape.from_hf_config(_cfg("mistral", sliding_window=128))
    shape.check_seq_len(128)
    with pytest.raises(ConfigError, match="sliding window of 128 tokens, shorter than train.seq_len 256"):
        shape.check_seq_len(256)
    with pytest.raises(ConfigError, match="TP size 3 does not divide the 4 attention heads"):
        shape.check_parallel(3, 1)
    assert DecoderShape.from_hf_config(_cfg("mistral", sliding_window=None)).sliding_window is None
