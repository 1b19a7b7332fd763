from .base import Family, register

# the tiny Llama's rope: llama3 scaling, so the tests cover transformers' own scaled frequencies
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


@register
class Llama(Family):
    """Llama 2, 3, 3.1, 3.2 (and SmolLM): the reference layer."""

    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_type = "llama"

    def tiny_config(self, tied=None, **shape):
        from transformers import LlamaConfig

        return LlamaConfig(**self.tiny_sizes(tied, **shape), rms_norm_eps=1e-5, rope_parameters=dict(LLAMA3_ROPE))
