"""Mixtral (8x7B, 8x22B)."""

from ...errors import CheckpointError
from ...mapping.experts import ExpertNames
from .base import Family, TINY, expect, register

# Mixtral's on-disk names: block_sparse_moe.experts.{e}.w1 (gate), w3 (up), w2 (down), .gate (router)
MIXTRAL_EXPERTS = ExpertNames(block="block_sparse_moe", projections={"gate_proj": "w1", "up_proj": "w3",
                                                                     "down_proj": "w2"})


@register
class Mixtral(Family):
    """Mistral's attention over a sparse MLP in every layer: ``num_local_experts`` experts of
    ``intermediate_size``, top-``num_experts_per_tok`` routing, always renormalised."""

    name = "mixtral"
    architectures = ("MixtralForCausalLM",)
    model_type = "mixtral"
    mixture_of_experts = True

    def check(self, cfg: dict) -> None:
        expect(cfg, self.name, hidden_act="silu")
        if cfg.get("router_jitter_noise"):
            raise CheckpointError(f"unsupported {self.name} config: router_jitter_noise={cfg['router_jitter_noise']!r} "
                                  "(the router is frozen and deterministic here); supported: 0")

    def sliding_window(self, cfg: dict) -> int | None:
        return cfg.get("sliding_window") or None

    def read(self, cfg: dict) -> dict:
        from transformers import MixtralConfig

        fields = super().read(cfg)
        text = MixtralConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")})
        return {**fields, **self.read_experts(cfg, text.num_local_experts, text.num_experts_per_tok,
                                              text.intermediate_size, True, (), MIXTRAL_EXPERTS)}

    def tiny_config(self, tied=None, sliding_window: int | None = None, **shape):
        """Every layer sparse; no window (Mixtral 8x7B has none)."""
        from transformers import MixtralConfig

        s = {**TINY, **shape}
        sizes = {**self.tiny_sizes(tied, **shape), "intermediate_size": s["moe_ffn"]}
        return MixtralConfig(**sizes, rms_norm_eps=1e-5, sliding_window=sliding_window,
                             num_local_experts=s["experts"], num_experts_per_tok=s["topk"],
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6})
