from .base import Family, register


@register
class Llama(Family):
    """Llama 2, 3, 3.1, 3.2 (and SmolLM): the reference layer."""

    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_type = "llama"
