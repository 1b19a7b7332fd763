"""Single-process checks of the subspace extraction against a float64 SVD reference."""

import pytest
import torch
from tiny import spectral_matrix

from milora_megatron.subspace import ShardedWeight, extract_subspaces, left_orthonormal

R = 16


def _sin_theta(basis, ref):
    """Largest principal-angle sine between two orthonormal bases (accurate near 0)."""
    return torch.linalg.matrix_norm(basis - ref @ (ref.t() @ basis), 2).item()


def _reference(w, which, r=R):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    sel = slice(0, r) if which == "principal" else slice(s.numel() - r, s.numel())
    return u[:, sel], s[sel], vh[sel].t()


@pytest.mark.parametrize("shape", [(512, 256), (256, 512)])
@pytest.mark.parametrize("shard_dim", [0, 1])
@pytest.mark.parametrize("which", ["minor", "principal"])
def test_matches_float64_svd_on_ill_conditioned_float32(shape, shard_dim, which):
    w = spectral_matrix(*shape, cond=1e4, gen=torch.Generator().manual_seed(1))
    (sub,) = extract_subspaces([ShardedWeight("w", w, shard_dim)], R, which)
    ref_u, ref_s, ref_v = _reference(w, which)
    assert ((sub.sigma - ref_s).abs() / ref_s).max() <= 1e-8  # measured ~2e-13
    # Subspaces: a Gram-based basis is exact to ~eps * cond^2 / relative gap (measured 3e-9..1e-8).
    assert _sin_theta(sub.v, ref_v) <= 3e-8
    assert _sin_theta(sub.u, ref_u) <= 3e-8
    eye = torch.eye(R, dtype=torch.float64)
    assert (sub.u.t() @ sub.u - eye).abs().max() <= 1e-12
    assert (sub.v.t() @ sub.v - eye).abs().max() <= 1e-12


def test_sign_convention_and_descending_order():
    w = spectral_matrix(96, 64, cond=100, gen=torch.Generator().manual_seed(2))
    for shard_dim in (0, 1):
        (sub,) = extract_subspaces([ShardedWeight("w", w, shard_dim)], 8, "minor")
        assert torch.all(sub.sigma[:-1] >= sub.sigma[1:])
        unsharded = sub.v if shard_dim == 0 else sub.u
        pivots = unsharded.gather(0, unsharded.abs().argmax(0, keepdim=True))
        assert torch.all(pivots > 0)
        # Reconstruction of the minor part: U S V^T == W V V^T.
        minor = (sub.u * sub.sigma) @ sub.v.t()
        ref_u, ref_s, ref_v = _reference(w, "minor", 8)
        assert torch.allclose(minor, (ref_u * ref_s) @ ref_v.t(), atol=1e-12)


def test_exact_backend_agrees_with_gram():
    w = spectral_matrix(128, 80, cond=1e3, gen=torch.Generator().manual_seed(3))
    for which in ("minor", "principal"):
        (g,) = extract_subspaces([ShardedWeight("w", w, 0)], 8, which)
        (e,) = extract_subspaces([ShardedWeight("w", w, 0)], 8, which, backend="exact")
        assert torch.allclose(g.sigma, e.sigma, rtol=1e-10)
        assert torch.allclose(g.v, e.v, atol=1e-8)
        assert torch.allclose(g.u, e.u, atol=1e-8)


@pytest.mark.parametrize("shard_dim", [0, 1])
def test_rank_deficient_gives_zeros_not_nans(shard_dim):
    gen = torch.Generator().manual_seed(4)
    # Small integers: the product is exact in float32, so the matrix is exactly rank 5.
    w = torch.randint(-3, 4, (64, 5), generator=gen).float() @ torch.randint(-3, 4, (5, 48), generator=gen).float()
    (sub,) = extract_subspaces([ShardedWeight("w", w, shard_dim)], 8, "minor")
    assert torch.isfinite(sub.u).all() and torch.isfinite(sub.v).all()
    assert torch.equal(sub.sigma, torch.zeros(8, dtype=torch.float64))
    assert sub.degenerate.all()
    # MiCA's orthonormal left factor is completed deterministically and is orthonormal.
    u = left_orthonormal(sub)
    assert torch.allclose(u.t() @ u, torch.eye(8, dtype=torch.float64), atol=1e-12)
    # Principal part of a rank-5 matrix is still exact.
    (top,) = extract_subspaces([ShardedWeight("w", w, shard_dim)], 5, "principal")
    ref_u, ref_s, ref_v = _reference(w, "principal", 5)
    assert torch.allclose(top.sigma, ref_s, rtol=1e-10)
    assert torch.allclose((top.u * top.sigma) @ top.v.t(), w.double(), atol=1e-10)


def test_partly_degenerate_selection_keeps_true_minor_values():
    gen = torch.Generator().manual_seed(5)
    w = spectral_matrix(40, 40, cond=10, gen=gen).double()
    u, s, vh = torch.linalg.svd(w)
    s[-3:] = 0  # rank 37
    w = (u * s) @ vh  # kept in float64 so the three zeros are zeros to ~1e-16
    (sub,) = extract_subspaces([ShardedWeight("w", w, 0)], 6, "minor")
    ref_s = torch.linalg.svdvals(w.double())[-6:]
    assert torch.equal(sub.degenerate, torch.tensor([False, False, False, True, True, True]))
    assert torch.allclose(sub.sigma[:3], ref_s[:3], rtol=1e-10)
    assert torch.isfinite(sub.u).all()


def test_repeated_singular_values_are_finite_and_span_the_space():
    # Orthogonal matrix: every singular value is 1. Any orthonormal basis is valid.
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    (sub,) = extract_subspaces([ShardedWeight("w", q.float(), 1)], 4, "minor")
    assert torch.allclose(sub.sigma, torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert torch.isfinite(sub.u).all() and torch.isfinite(sub.v).all()
    # U S V^T still equals W V V^T for the chosen basis.
    assert torch.allclose((sub.u * sub.sigma) @ sub.v.t(), q @ sub.v @ sub.v.t(), atol=1e-6)


def test_rank_larger_than_matrix_names_layer_and_shape():
    w = torch.randn(24, 16)
    with pytest.raises(ValueError, match=r"layers\.3\.k_proj.*24 x 16.*between 1 and 16"):
        extract_subspaces([ShardedWeight("layers.3.k_proj", w, 0)], 17, "minor")


def test_bfloat16_input_is_handled_in_float64():
    w32 = spectral_matrix(128, 64, cond=1e4, gen=torch.Generator().manual_seed(7))
    w16 = w32.to(torch.bfloat16)
    (sub,) = extract_subspaces([ShardedWeight("w", w16, 0)], 8, "minor")
    _, ref_s, _ = _reference(w16, "minor", 8)  # the bf16 matrix's own spectrum
    assert ((sub.sigma - ref_s).abs() / ref_s).max() <= 1e-8
