"""Gemma 3 (270M, 1B; the text model of 4B, 12B, 27B)."""

from ...errors import CheckpointError
from ...mapping.decoder import POST_ATTENTION_NORM, POST_MLP_NORM
from .base import Family, Wrapper, expect, register

LAYER_TYPES = ("sliding_attention", "full_attention")


@register
class Gemma3(Family):
    """Gemma 3's text decoder. Unlike Llama: windowed (local) and full (global) layers by
    ``layer_types``, each kind with its own rope base (the global one may be scaled); four
    norms per layer, the attention and MLP outputs normalised before the residual add; q/k
    norms; every norm scales by ``1 + w``; GeGLU; embeddings times sqrt(hidden); attention
    scaled by ``query_pre_attn_scalar``; tied embeddings. The config is read through
    transformers' own ``Gemma3TextConfig``, so the Hub's older keys (``rope_local_base_freq``,
    ``rope_scaling``, ``sliding_window_pattern``) mean what they mean to transformers."""

    name = "gemma3"
    architectures = ("Gemma3ForCausalLM",)
    model_type = "gemma3_text"
    qk_norm = True
    tiny_tied = True
    # 4B, 12B, 27B: Gemma3ForConditionalGeneration, its language model read as this text model
    wrappers = (Wrapper("Gemma3ForConditionalGeneration",
                        weight_prefixes={"language_model.model.": "model.", "model.language_model.": "model.",
                                         "language_model.lm_head.": "lm_head.", "lm_head.": "lm_head."},
                        module_prefix="model.language_model."),)
    norms = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": POST_ATTENTION_NORM,
        "pre_feedforward_layernorm.weight": "pre_mlp_layernorm.weight",
        "post_feedforward_layernorm.weight": POST_MLP_NORM,
    }

    def check(self, cfg: dict) -> None:
        expect(cfg, self.name, hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
               attention_bias=False, use_bidirectional_attention=False)
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if cfg.get(key) is not None:
                raise CheckpointError(f"unsupported {self.name} config: {key}={cfg[key]!r} (soft-capping); "
                                      "supported: null, as Gemma 3 has it")

    def read(self, cfg: dict) -> dict:
        from transformers import Gemma3TextConfig

        self.check(cfg)
        text = Gemma3TextConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")})
        rope = text.rope_parameters
        types = tuple(text.layer_types)
        if set(types) - set(LAYER_TYPES) or len(types) != text.num_hidden_layers:
            raise CheckpointError(f"unsupported {self.name} config: layer_types {list(types)} (expected "
                                  f"{text.num_hidden_layers} of {list(LAYER_TYPES)})")
        local = rope["sliding_attention"]
        if local.get("rope_type", "default") != "default":
            raise CheckpointError(f"unsupported {self.name} config: rope_parameters.sliding_attention.rope_type="
                                  f"{local['rope_type']!r} (supported: 'default')")
        fields = super().read({**text.to_dict(), "rope_parameters": rope["full_attention"]})
        return {**fields, "zero_centered_norms": True, "activation": "gelu_tanh",
                "embedding_scale": text.hidden_size ** 0.5, "softmax_scale": text.query_pre_attn_scalar ** -0.5,
                "sliding_window": text.sliding_window, "layer_types": types,
                "local_rope_theta": float(local["rope_theta"])}

    def tiny_config(self, tied=None, sliding_window: int = 8, head_dim: int = 32, **shape):
        """Local and global layers alternating, a window (8) shorter than the tests'
        sequences, a scaled global rope, head_dim != hidden / heads and an attention scale
        that is not 1 / sqrt(head_dim)."""
        from transformers import Gemma3TextConfig

        sizes = self.tiny_sizes(tied, **shape)
        layers = sizes["num_hidden_layers"]
        return Gemma3TextConfig(
            **sizes, head_dim=head_dim, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
            sliding_window=sliding_window, query_pre_attn_scalar=24,
            layer_types=[LAYER_TYPES[i % 2] for i in range(layers)],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
