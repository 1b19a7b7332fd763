"""milora_megatron/adapters/layer.py: a factor's gradient stays fp32 under bf16 activations
(not rounded to bf16 before it reaches the fp32 master), and fp32 runs take the plain matmul."""

import torch

from milora_megatron.adapters.layer import factor_matmul


def test_a_factor_gradient_is_accumulated_in_fp32_under_bf16_activations():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=gen).to(torch.bfloat16).requires_grad_()
    w = (0.05 * torch.randn(16, 512, generator=gen)).requires_grad_()
    g = torch.randn(256, 16, generator=gen).to(torch.bfloat16)
    reference = g.double().t() @ x.detach().double()  # dL/dw for L = <g, x w^T>

    y = factor_matmul(x, w)
    assert y.dtype == torch.bfloat16
    y.backward(g)
    ours = w.grad.clone()
    assert ours.dtype == torch.float32
    w.grad = None
    (x.detach() @ w.to(torch.bfloat16).t()).backward(g)  # the plain path: the gradient rounded to bf16
    plain = w.grad

    def rel(t):
        return ((t.double() - reference).norm() / reference.norm()).item()

    assert rel(ours) < 1e-6 and rel(plain) > 1e-3  # measured: ~1e-8 against ~2e-3
    torch.testing.assert_close(x.grad, g @ w.detach().to(torch.bfloat16))  # the input gradient is as before


def test_fp32_activations_take_the_plain_matmul():
    x = torch.randn(8, 32)
    w = torch.randn(4, 32, requires_grad=True)
    y = factor_matmul(x, w)
    assert y.grad_fn.name() == "MmBackward0" and torch.equal(y, x @ w.t())
