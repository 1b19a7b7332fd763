"""What every family shares: reading the Llama-like part of an HF config, and the sizes of
the tiny test models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import CheckpointError
from ...mapping.decoder import LAYER_NORMS
from ...mapping.experts import ExpertNames

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# what every family's config must give: the model's sizes
SIZE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
# the tiny models every family's tests are built at (models/tiny_hf.py); MoE ones add
# experts of moe_ffn, top-k
TINY = dict(layers=4, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=1000, experts=4, topk=2, moe_ffn=32)
# what a mixture-of-experts config may set that megatron's MoE layer here does not do: each
# refused by name (a family or architecture that needs one is refused before it gets here)
UNSUPPORTED_MOE_KEYS = {
    "shared_expert_intermediate_size": "shared experts", "n_shared_experts": "shared experts",
    "num_shared_experts": "shared experts", "moe_shared_expert_intermediate_size": "shared experts",
    "kv_lora_rank": "MLA attention", "q_lora_rank": "MLA attention",
    "topk_method": "expert-bias routing", "moe_router_enable_expert_bias": "expert-bias routing",
    "n_group": "group-limited routing", "topk_group": "group-limited routing",
}

_REGISTRY: dict[str, "Family"] = {}


@dataclass(frozen=True)
class Wrapper:
    """A multimodal checkpoint whose text decoder is one of this family's, read text-only:
    its config's ``text_config`` and the weights under ``weight_prefixes`` (on-disk prefix ->
    the text model's); everything else (a vision tower, a projector) is left out, and
    exports are the text model. ``module_prefix``: where the text model's ``model.`` modules
    sit inside the wrapper, for adapters loaded onto the original."""

    architecture: str
    weight_prefixes: dict
    module_prefix: str


def register(cls):
    _REGISTRY[cls.name] = cls()
    return cls


def registered() -> list["Family"]:
    return list(_REGISTRY.values())


class Family:
    """One HF decoder family, declared in one module: which configs it reads (``architectures``,
    ``model_type``), what it refuses (``check``), what its layers hold beyond Llama's (the class
    attributes below, and ``read`` for the rest of ``models.decoder.DecoderShape``), and its
    tiny test model (``tiny_config``). Tests iterate the registry, so a new family is tested
    wherever the others are."""

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    model_type: ClassVar[str]
    qkv_bias: ClassVar[bool] = False  # biases on q, k, v (not o), fused like the weight
    qk_norm: ClassVar[bool] = False  # per-head RMSNorm on q and k before rope
    norms: ClassVar[dict[str, str]] = LAYER_NORMS  # HF layer norm -> megatron (mapping/decoder.py)
    tiny_tied: ClassVar[bool] = False  # whether its tiny test model ties the embeddings
    wrappers: ClassVar[tuple[Wrapper, ...]] = ()  # multimodal checkpoints read as this family's text model
    mixture_of_experts: ClassVar[bool] = False  # sparse MLPs (read_experts)

    def read(self, cfg: dict) -> dict:
        """The ``DecoderShape`` fields of an HF config dict."""
        self.check(cfg)
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(f"unsupported rope type {rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        size = {key: required(cfg, self.name, key) for key in SIZE_KEYS}
        heads = size["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        if heads % kv:
            raise CheckpointError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        return dict(
            layers=size["num_hidden_layers"], hidden=size["hidden_size"], heads=heads, kv_heads=kv,
            ffn=size["intermediate_size"], vocab=size["vocab_size"], head_dim=cfg.get("head_dim"),
            max_seq=cfg.get("max_position_embeddings", 4096), rope_theta=float(theta),
            rope_scaling=rope if rope_type != "default" else None, rms_eps=cfg.get("rms_norm_eps", 1e-5),
            tied=bool(cfg.get("tie_word_embeddings", False)), family=self.name, qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm, norms=dict(self.norms), sliding_window=self.sliding_window(cfg),
        )

    def check(self, cfg: dict) -> None:
        """Refuse what the shared GPT layer cannot do (Llama-like: silu, no biases)."""
        expect(cfg, self.name, hidden_act="silu", attention_bias=False, mlp_bias=False)

    def sliding_window(self, cfg: dict) -> int | None:
        """How far attention reaches back, None when it is full."""
        return None

    def read_experts(self, cfg: dict, experts: int, topk: int, moe_ffn: int, norm_topk: bool,
                     dense_layers: tuple[int, ...], names: ExpertNames) -> dict:
        """The ``DecoderShape`` fields of a mixture-of-experts config (its sizes as the family
        read them), refusing what megatron's MoE layer here does not do, by key."""
        for key, what in UNSUPPORTED_MOE_KEYS.items():
            if cfg.get(key):
                raise CheckpointError(f"unsupported {self.name} config: {key}={cfg[key]!r} ({what} are not supported)"
                                      if what.endswith("experts") else
                                      f"unsupported {self.name} config: {key}={cfg[key]!r} ({what} is not supported)")
        for key, value in (("experts", experts), ("experts per token", topk), ("expert FFN size", moe_ffn)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{self.name} config: {key} {value!r} is not a positive integer")
        if topk > experts:
            raise CheckpointError(f"{self.name} config: {topk} experts per token but only {experts} experts")
        return dict(experts=experts, experts_topk=topk, moe_ffn=moe_ffn, norm_topk=bool(norm_topk),
                    dense_layers=tuple(dense_layers), expert_names=names)

    def tiny_config(self, tied: bool | None = None, **shape):
        """A tiny transformers config of this family (GQA, ``TINY`` sizes unless ``shape``
        says otherwise) with what sets the family apart, built by transformers' own class."""
        raise NotImplementedError

    def tiny_sizes(self, tied: bool | None, **shape) -> dict:
        """The config keys every tiny model shares, for ``tiny_config``."""
        s = {**TINY, **shape}
        return dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                    num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                    max_position_embeddings=256, tie_word_embeddings=self.tiny_tied if tied is None else tied,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=[self.architectures[0]])


def expect(cfg: dict, family: str, **expected) -> None:
    for key, value in expected.items():
        got = cfg.get(key)
        if got is not None and got != value:
            raise CheckpointError(f"unsupported {family} config: {key}={got!r} (supported: {value!r})")


def required(cfg: dict, family: str, key: str) -> int:
    """A size the config must give, as a positive integer (a config without it is damaged or
    not a decoder's)."""
    if key not in cfg:
        raise CheckpointError(f"{family} config has no {key} (a damaged config.json, or not a decoder's)")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{family} config: {key}={value!r} is not a positive integer")
    return value
