from .base import Family, register


@register
class Mistral(Family):
    """Mistral: a Llama layer; v0.1 limits attention to a sliding window (every layer), later
    ones do not."""

    name = "mistral"
    architectures = ("MistralForCausalLM",)
    model_type = "mistral"

    def sliding_window(self, cfg: dict) -> int | None:
        return cfg.get("sliding_window") or None

    def tiny_config(self, tied=None, sliding_window: int | None = 8, **shape):
        """Its window (8) is shorter than the tests' sequences, so they cover it."""
        from transformers import MistralConfig

        return MistralConfig(**self.tiny_sizes(tied, **shape), rms_norm_eps=1e-6, sliding_window=sliding_window)
