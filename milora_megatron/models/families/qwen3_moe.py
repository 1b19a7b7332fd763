"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B)."""

from ...mapping.experts import ExpertNames
from .base import TINY, register
from .qwen3 import Qwen3


@register
class Qwen3Moe(Qwen3):
    """Qwen3's attention (q/k norms, explicit head_dim; its checks) over a sparse MLP: ``num_experts``
    experts of ``moe_intermediate_size``, top-``num_experts_per_tok`` routing (renormalised
    with ``norm_topk_prob``), sparse every ``decoder_sparse_step`` layers except
    ``mlp_only_layers``, which keep a dense MLP of ``intermediate_size``. The config is read
    through transformers' ``Qwen3MoeConfig``, so its keys mean what they mean there."""

    name = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    model_type = "qwen3_moe"
    mixture_of_experts = True

    def read(self, cfg: dict) -> dict:
        from transformers import Qwen3MoeConfig

        fields = super().read(cfg)  # with Qwen3's check: q/k norms, no biases, full attention
        text = Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")})
        experts = text.num_experts
        dense = tuple(i for i in range(text.num_hidden_layers)
                      if i in (text.mlp_only_layers or []) or (i + 1) % text.decoder_sparse_step != 0)
        return {**fields, **self.read_experts(cfg, experts, text.num_experts_per_tok, text.moe_intermediate_size,
                                              text.norm_topk_prob, dense, ExpertNames())}

    def tiny_config(self, tied=None, head_dim: int | None = None, dense_layers=(0,), norm_topk: bool = False,
                    **shape):
        """A dense first layer (``mlp_only_layers``) before sparse ones, top-k probabilities
        not renormalised (Mixtral's tiny model covers the renormalised routing), head_dim
        twice hidden / heads."""
        from transformers import Qwen3MoeConfig

        s = {**TINY, **shape}
        sizes = self.tiny_sizes(tied, **shape)
        return Qwen3MoeConfig(**sizes, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                              head_dim=head_dim or 2 * sizes["hidden_size"] // sizes["num_attention_heads"],
                              num_experts=s["experts"], num_experts_per_tok=s["topk"],
                              moe_intermediate_size=s["moe_ffn"], mlp_only_layers=list(dense_layers),
                              decoder_sparse_step=1, norm_topk_prob=norm_topk)
