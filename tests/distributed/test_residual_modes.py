"""PiSSA/MiLoRA residual modes on a bf16 layer: the model must start unchanged."""

import pytest
import torch
from distributed import run_distributed
from tiny import spectral_matrix

N, RANK = 256, 16


def _worker(method, residual):
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.adapters.apply import adapt_linear

    cfg = TransformerConfig(num_layers=1, hidden_size=N, num_attention_heads=4, use_cpu_initialization=True,
                            params_dtype=torch.bfloat16, bf16=True, gradient_accumulation_fusion=False)
    layer = ColumnParallelLinear(N, N, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                                 gather_output=False, skip_bias_add=True)
    w = spectral_matrix(N, N, cond=1e4, gen=torch.Generator().manual_seed(5), dtype=torch.bfloat16)
    x = torch.randn(64, 1, N, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(w)
        base, _ = layer(x)
    adapt_linear(layer, "q_proj", AdapterConfig(method=method, rank=RANK, residual=residual, targets=["q_proj"], dropout=0.0))
    with torch.no_grad():
        out, _ = layer(x)
    return {"rel": ((out.float() - base.float()).norm() / base.float().norm()).item(),
            "weight_unchanged": torch.equal(layer.weight, w)}


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_bf16_branch_mode_is_exact_and_merge_mode_is_not(method):
    branch = run_distributed(_worker, world=1, method=method, residual="branch")[0]
    merge = run_distributed(_worker, world=1, method=method, residual="merge")[0]
    assert branch["weight_unchanged"] and branch["rel"] == 0.0
    assert not merge["weight_unchanged"]
    # merge rounds W - s*B0*A0 to bf16: ~2^-9 relative per entry, ~1e-4..1e-3 on the output.
    assert 0.0 < merge["rel"] <= 1e-2
