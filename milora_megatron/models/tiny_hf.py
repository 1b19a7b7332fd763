"""Tiny decoders in Hugging Face format (Llama, and Qwen2, Qwen3, Mistral for the family
tests), built locally from transformers' own config classes: nothing is downloaded. For the
demo, the tests and the replication scripts."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

TINY = dict(layers=4, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=1000)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def hf_config(tied: bool = False, **shape):
    from transformers import LlamaConfig

    s = {**TINY, **shape}
    return LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters=dict(LLAMA3_ROPE), bos_token_id=1, eos_token_id=2, pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )


def family_config(family: str, tied: bool = False, **shape):
    """A tiny config of ``family`` (llama, qwen2, qwen3, mistral), GQA, with what sets the
    family apart: Qwen2's q/k/v biases and large rope theta, Qwen3's q/k norms and a head_dim
    that is not hidden / heads, Mistral's sliding window (here longer than any test sequence)."""
    import transformers

    if family == "llama":
        return hf_config(tied, **shape)
    s = {**TINY, **shape}
    common = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                        architectures=["Qwen2ForCausalLM"])
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=s.get("head_dim", 2 * s["hidden"] // s["heads"]),
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                        architectures=["Qwen3ForCausalLM"])
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=s.get("sliding_window", 4096),
                                          architectures=["MistralForCausalLM"])
    raise ConfigError(f"no tiny config for family {family!r}")


FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def make_hf_model(path: str, tied: bool = False, seed: int = 0, dtype=torch.float32,
                  max_shard_size: str = "100KB", family: str = "llama", **shape):
    """Save a random tiny model of ``family`` at ``path`` (sharded safetensors + index) and
    return it.

    Weights are scaled so activations and logits are O(1): with HF's default 0.02 init the
    logits are ~1e-3 and any comparison at 1e-4 would be vacuous.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tied, **shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    model = model.to(dtype)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=4)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model.eval()


# a ChatML-like chat template on the tokenizer's own BOS/EOS (no new tokens, so the model's
# vocabulary is unchanged); the assistant's turn ends with EOS
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def make_tokenizer(path: str, texts: list[str], vocab: int = 1000) -> None:
    """A byte-level BPE tokenizer trained on ``texts`` (local, seconds) with ``CHAT_TEMPLATE``,
    saved into ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_bos_token = True
    from tokenizers import processors

    fast._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
