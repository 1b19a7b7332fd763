"""A method is one file: its class declares its name, display name, the subspace its init
needs and the papers' alpha / rank, and everything else asks the registry. Shown with a
throwaway method registered here and nowhere else."""

import os

import torch
from distributed import run_distributed

from milora_megatron.adapters.variants import Factors, InitContext, Variant, available, get_variant, register

from paths import ROOT  # noqa: E402


class Throwaway(Variant):
    """Minor left singular vectors as a trainable B, A = 0: the update starts at zero."""

    name = "throwaway"
    display_name = "Throwaway"
    subspace = "minor"
    paper_alpha_per_rank = 0.5

    def init(self, ctx: InitContext) -> Factors:
        from milora_megatron.subspace import left_orthonormal

        b = left_orthonormal(ctx.subspace, ctx.tp_group)
        return Factors(a=torch.zeros(ctx.rank, ctx.local_shape[1], dtype=torch.float64), b=b)


def test_each_method_declares_its_facts():
    assert available() == ["lora", "mica", "milora", "pissa"]
    facts = {m: (get_variant(m).display_name, get_variant(m).subspace, get_variant(m).paper_alpha_per_rank)
             for m in available()}
    assert facts == {"lora": ("LoRA", None, 2.0), "mica": ("MiCA", "minor", 1.0),
                     "milora": ("MiLoRA", "minor", 1.0), "pissa": ("PiSSA", "principal", 1.0)}


def _adapt_with_throwaway():
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.adapters.apply import adapt_linear
    from tiny import spectral_matrix

    register(Throwaway)  # in this (spawned) process too
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                            gradient_accumulation_fusion=False)
    layer = ColumnParallelLinear(32, 24, config=cfg, init_method=torch.nn.init.zeros_, bias=False, gather_output=True)
    w = spectral_matrix(24, 32, cond=100.0, gen=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.weight.copy_(w)
    target = adapt_linear(layer, "q_proj", AdapterConfig(method="throwaway", rank=4, targets=["q_proj"], dropout=0.0))
    return w, target.adapter.lora_B.detach().double(), target.adapter.lora_A.detach()


def test_a_new_method_is_one_class():
    from replication.report import display

    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.adapters.variants.base import _REGISTRY
    from milora_megatron.analysis import init_side
    from milora_megatron.train.config import load_config

    register(Throwaway)
    try:
        assert "throwaway" in available()
        assert AdapterConfig(method="throwaway").method == "throwaway"
        assert load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), ["peft.method=throwaway"]).peft.method == "throwaway"
        assert init_side("throwaway") == "bottom" and display("throwaway") == "Throwaway"
    finally:
        del _REGISTRY["throwaway"]
    (w, b, a), = run_distributed(_adapt_with_throwaway, world=1)
    u = torch.linalg.svd(w.double())[0][:, -4:]  # W's minor left singular vectors
    assert torch.allclose(b.abs(), u.abs(), atol=1e-6) and torch.equal(a, torch.zeros_like(a))


