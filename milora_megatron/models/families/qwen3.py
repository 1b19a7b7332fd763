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

    def tiny_config(self, tied=None, head_dim: int | None = None, **shape):
        """A head_dim that is not hidden / heads (twice it), as Qwen3's configs have."""
        from transformers import Qwen3Config

        sizes = self.tiny_sizes(tied, **shape)
        return Qwen3Config(**sizes, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                           head_dim=head_dim or 2 * sizes["hidden_size"] // sizes["num_attention_heads"])
