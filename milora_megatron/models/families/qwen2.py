from ...errors import CheckpointError
from .base import Family, expect, register


def full_attention_only(cfg: dict, family: str) -> None:
    """Qwen configs carry a window that only applies with ``use_sliding_window``."""
    if cfg.get("use_sliding_window"):
        raise CheckpointError(f"unsupported {family} config: use_sliding_window=true (sliding-window attention); "
                         "only full attention is supported")
    kinds = set(cfg.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise CheckpointError(f"unsupported {family} config: layer_types {sorted(kinds)}; only full_attention is supported")


@register
class Qwen2(Family):
    """Qwen2 and Qwen2.5: biases on q, k and v (not o); small sizes tie the embeddings."""

    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    model_type = "qwen2"
    qkv_bias = True
    tiny_tied = True

    def check(self, cfg: dict) -> None:
        expect(cfg, self.name, hidden_act="silu", mlp_bias=False)
        full_attention_only(cfg, self.name)

    def tiny_config(self, tied=None, **shape):
        """Large rope theta, tied embeddings as the small Qwen2.5 sizes have them."""
        from transformers import Qwen2Config

        return Qwen2Config(**self.tiny_sizes(tied, **shape), rms_norm_eps=1e-6,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
