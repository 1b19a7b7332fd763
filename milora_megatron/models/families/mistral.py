from .base import Family, register


@register
class Mistral(Family):
    """Mistral: a Llama layer; v0.1 limits attention to a sliding window, later ones do not."""

    name = "mistral"
    architectures = ("MistralForCausalLM",)
    model_type = "mistral"

    def sliding_window(self, cfg: dict) -> int | None:
        return cfg.get("sliding_window") or None
