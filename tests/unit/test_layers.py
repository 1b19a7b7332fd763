"""milora_megatron/models/layers.py: the fused RMSNorm against transformers' own LlamaRMSNorm
(the reference definition), forward and backward, in fp32 and bf16."""

import types

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from milora_megatron.models.layers import RMSNorm

    torch.manual_seed(0)
    hidden, eps = 256, 1e-5
    ours = RMSNorm(types.SimpleNamespace(params_dtype=dtype, sequence_parallel=False), hidden, eps=eps)
    ref = LlamaRMSNorm(hidden, eps=eps).to(dtype)
    with torch.no_grad():
        w = (1 + 0.1 * torch.randn(hidden)).to(dtype)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    for scale in (1e-3, 1.0, 40.0):  # small, unit and outlier-sized activations
        x = (scale * torch.randn(16, 3, hidden)).to(dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        g = torch.randn_like(ya)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        assert ya.dtype == yb.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6 / scale)
        else:  # within bf16 rounding: at most one unit in the last place
            ulp = torch.finfo(torch.bfloat16).eps * yb.float().abs().clamp_min(1e-30)
            assert ((ya.float() - yb.float()).abs() <= ulp).all()
            assert torch.allclose(xa.grad.float(), xb.grad.float(), rtol=2e-2, atol=2e-2 / scale)


def test_the_fused_swiglu_is_used_on_a_gpu_and_agrees_with_the_plain_one():
    """models/decoder.py turns on megatron's bias_swiglu fusion for GPU runs only; here its
    kernel (compiled on the CPU too) against the plain SiLU(y1) * y2 the CPU path runs."""
    import torch.nn.functional as F
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    from milora_megatron.models.decoder import DecoderShape, transformer_config
    from milora_megatron.models.tiny_hf import hf_config

    shape = DecoderShape.from_hf_config(hf_config().to_dict())
    assert transformer_config(shape, device="cuda").bias_activation_fusion
    assert not transformer_config(shape, device="cpu").bias_activation_fusion
    torch.manual_seed(0)
    y = torch.randn(64, 2, 256)
    ya, yb = y.clone().requires_grad_(), y.clone().requires_grad_()
    fused = bias_swiglu_impl(ya, None, False, False)
    y1, y2 = torch.chunk(yb, 2, -1)
    plain = F.silu(y1) * y2
    g = torch.randn_like(plain)
    fused.backward(g)
    plain.backward(g)
    assert torch.equal(fused, plain)
    torch.testing.assert_close(ya.grad, yb.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centered_rmsnorm_matches_gemma3s(dtype):
    """Gemma's norm scales by (1 + w) in fp32 before the cast; bit for bit with transformers'."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from milora_megatron.models.layers import ZeroCenteredRMSNorm

    torch.manual_seed(1)
    ours = ZeroCenteredRMSNorm(types.SimpleNamespace(params_dtype=dtype, sequence_parallel=False), 64, eps=1e-6)
    assert (ours.weight == 0).all()  # the identity
    ref = Gemma3RMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        w = (0.1 * torch.randn(64)).to(dtype)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    x = (3 * torch.randn(8, 2, 64)).to(dtype)
    assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("window", [1, 3, 8, 20])
def test_the_window_is_transformers_own_at_the_edge(window):
    """Key j is seen from query i iff i - window < j <= i: the same boolean matrix as
    transformers' sliding-window causal mask function, the edge (j = i - window + 1 seen,
    j = i - window not) included; a window at least the sequence is plain causal."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    from milora_megatron.models.layers import _window_band

    seq = 12
    allowed = sliding_window_causal_mask_function(window)
    ref = torch.tensor([[bool(allowed(0, 0, torch.tensor(i), torch.tensor(j))) for j in range(seq)] for i in range(seq)])
    band = _window_band(seq, window, torch.device("cpu"))
    assert torch.equal(~band, ref)
    assert int((~band)[seq - 1].sum()) == min(window, seq)


def test_windowed_layers_share_one_mask_per_micro_batch():
    """Every windowed layer gets the same mask object for one micro-batch's packed mask (one
    s x s boolean, not one per layer), and a new micro-batch gets a new one."""
    from milora_megatron.models.layers import allowed_mask

    packed = torch.ones(1, 1, 6, 6, dtype=torch.bool).triu(1)
    first = allowed_mask(packed, 2, 6, torch.device("cpu"))
    assert allowed_mask(packed, 2, 6, torch.device("cpu")) is first
    assert int(first[0, 0, 5].sum()) == 2
    other = packed.clone()
    assert allowed_mask(other, 2, 6, torch.device("cpu")) is not first
