from .base import Family, expect, register
from .qwen2 import full_attention_only


@register
class Qwen3(Family):
    """Qwen3 (dense): per-head RMSNorm on q and k, an explicit head_dim, no biases."""

    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    model_type = "qwen3"
    qk_norm = True

    def check(self, cfg: dict) -> None:
        expect(cfg, self.name, hidden_act="silu", attention_bias=False, mlp_bias=False)
        full_attention_only(cfg, self.name)
