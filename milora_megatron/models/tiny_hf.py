"""Tiny decoders in Hugging Face format, one per family (models/families/: each declares
its own tiny config), built locally from transformers' own config classes: nothing is
downloaded. For the demo, the tests and the replication scripts."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .families import registered
from .families.base import TINY  # noqa: F401  (the tiny sizes, for callers)
from .families.llama import LLAMA3_ROPE  # noqa: F401

ROUTER_SCALE = 4.0  # see make_hf_model
# every registered family, Llama (the reference) first
FAMILIES = tuple(sorted((f.name for f in registered()), key=lambda name: name != "llama"))
# the mixture-of-experts ones, for the tests that also run them at expert-parallel layouts
MOE_FAMILIES = tuple(f for f in FAMILIES if any(r.name == f and r.mixture_of_experts for r in registered()))


def family_config(family: str, tied: bool | None = None, **shape):
    """A tiny transformers config of ``family`` (its module's ``tiny_config``)."""
    for candidate in registered():
        if candidate.name == family:
            return candidate.tiny_config(tied, **shape)
    raise ConfigError(f"no tiny config for family {family!r}; families: {list(FAMILIES)}")


def hf_config(tied: bool = False, **shape):
    """The tiny Llama's config."""
    return family_config("llama", tied, **shape)


def make_hf_model(path: str, tied: bool | None = None, seed: int = 0, dtype=torch.float32,
                  max_shard_size: str = "100KB", family: str = "llama", **shape):
    """Save a random tiny model of ``family`` at ``path`` (sharded safetensors + index) and
    return it (``tied`` None: as the family's tiny model has it).

    Weights are scaled so activations and logits are O(1): with HF's default 0.02 init the
    logits are ~1e-3 and any comparison at 1e-4 would be vacuous. An MoE router's logits are
    scaled up further (``ROUTER_SCALE``) so that routing is decisive: no token has a near-tie
    between its k-th and (k+1)-th expert that rounding could flip between two implementations.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tied, **shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:  # fan-in: the last dim (transformers holds experts as (experts, out, in))
                p.normal_(0.0, (ROUTER_SCALE if name.endswith(".mlp.gate.weight") else 1.0) / math.sqrt(p.shape[-1]))
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
