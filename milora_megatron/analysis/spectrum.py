"""How an update dW relates to its base weight W, in float64 (MiLoRA paper section 5.3, after
Hu et al. 2021 section 7): amplification factor, normalised subspace similarity of dW's top-r
singular vectors to W's top-r and bottom-r ones, and the singular values of W each method's
initial factors came from.

Pure functions of torch tensors. Every SVD here is a full float64 one: this is offline
analysis, and the minor directions are exactly the ones a float32 SVD gets wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

# The reports' words for the two ends of W's spectrum, by a method's declared subspace.
SIDE = {"principal": "top", "minor": "bottom"}


def init_side(method: str | None) -> str | None:
    """"top" / "bottom": which of W's singular triplets ``method``'s initial factors are built
    from, as the method declares it (adapters/variants); None for LoRA or no method."""
    if method is None:
        return None
    from ..adapters.variants import get_variant

    subspace = get_variant(method).subspace
    return SIDE[subspace] if subspace else None


@dataclass
class SVD:
    """Thin SVD, singular values descending: M = u diag(s) v^T."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def svd64(m: torch.Tensor) -> SVD:
    """Full thin float64 SVD of a dense matrix."""
    u, s, vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
    return SVD(u, s, vh.mT)


def lowrank_svd64(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> SVD:
    """Exact SVD of ``scale * b @ a`` (b: [out, k], a: [k, in]) without forming it: two thin
    QRs and a k x k SVD, so a LoRA update of a 4096 x 14336 weight costs O((out + in) k^2)."""
    b, a = b.to(torch.float64), a.to(torch.float64)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.mT)
    uc, s, vch = torch.linalg.svd(scale * rb @ ra.mT)
    return SVD(qb @ uc, s, qa @ vch.mT)


def subspace_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    """Normalised subspace similarity of two column-orthonormal bases (Hu et al. 2021):
    phi = ||x^T y||_F^2 / min(i, j), 1 when one span contains the other, 0 when orthogonal."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    return float((x.mT @ y).square().sum() / min(x.shape[1], y.shape[1]))


def similarity_to_w(w: SVD, dw: SVD, r: int) -> dict[str, float]:
    """Where dW's top-r row and column spaces lie: in W's top-r or bottom-r singular subspace.
    left_* compares left singular vectors (output space), right_* right ones (input space)."""
    du, dv = dw.u[:, :r], dw.v[:, :r]
    return {
        "left_top": subspace_similarity(du, w.u[:, :r]),
        "left_bottom": subspace_similarity(du, w.u[:, -r:]),
        "right_top": subspace_similarity(dv, w.v[:, :r]),
        "right_bottom": subspace_similarity(dv, w.v[:, -r:]),
    }


def chance_similarity(shape: tuple[int, int], r: int) -> dict[str, float]:
    """Expected similarity of r random directions to a fixed r-dim subspace: r / dim."""
    out_dim, in_dim = shape
    return {"left": r / out_dim, "right": r / in_dim}


def projected_norm(m: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """||u^T m v||_F: the magnitude of m inside the (u, v) subspace pair."""
    return float(torch.linalg.matrix_norm(u.mT @ m.to(torch.float64) @ v))


def amplification(w: torch.Tensor, dw: SVD, r: int) -> dict[str, float | None]:
    """Amplification factor ||dW||_F / ||U^T W V||_F, U, V = dW's top-r singular vectors
    (Hu et al. 2021, sec. 7.3): how strongly dW amplifies directions W itself barely uses.

    ``amplification_projected`` is ||U^T dW V||_F / ||U^T W V||_F, the ratio the MiLoRA paper's
    Table 7 prints; the two agree when rank(dW) <= r, and differ for PiSSA/MiLoRA exports whose
    update s (B A - B0 A0) has rank up to 2r.
    """
    u, v = dw.u[:, :r], dw.v[:, :r]
    utwv = projected_norm(w, u, v)
    dw_fro = float(dw.s.square().sum().sqrt())  # dw is a full SVD (dense) or exact (factored)
    utdwv = float(dw.s[:r].square().sum().sqrt())  # ||U^T dW V||_F = sqrt(sum of the top-r sigma^2)
    ok = utwv > 0 and dw_fro > 0
    return {
        "amplification": dw_fro / utwv if ok else None,
        "amplification_projected": utdwv / utwv if ok else None,
        "dw_fro": dw_fro,
        "utdwv_fro": utdwv,
        "utwv_fro": utwv,
    }


def random_projected_norm(w: torch.Tensor, r: int, seed: int) -> float:
    """||U^T W V||_F for random orthonormal r-frames: the "Random" column of the paper's Table 7."""
    gen = torch.Generator().manual_seed(seed)
    out_dim, in_dim = w.shape
    u = torch.linalg.qr(torch.randn(out_dim, r, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_dim, r, generator=gen, dtype=torch.float64))[0]
    return projected_norm(w, u, v)


def init_singular_values(sigma: torch.Tensor, r: int, method: str | None) -> dict:
    """W's top-r and bottom-r singular values, and which of them ``method``'s initial factors
    were built from (None for LoRA, which starts from random A and zero B, or an unknown method)."""
    which = init_side(method)
    top, bottom = sigma[:r].tolist(), sigma[-r:].tolist()
    return {
        "init_subspace": which,
        "init": {"top": top, "bottom": bottom}[which] if which else None,
        "top": top,
        "bottom": bottom,
        "max": float(sigma[0]),
        "min": float(sigma[-1]),
        "fro": float(sigma.square().sum().sqrt()),
        "count": int(sigma.numel()),
    }


def matched_init(init_sigma: torch.Tensor, w_sigma: torch.Tensor, r: int) -> dict[str, float]:
    """Relative error of the singular values of an exported initial update s B0 A0 against W's
    top-r and bottom-r ones: measures (rather than assumes) where the initial factors came from."""
    got = init_sigma[:r].to(torch.float64)

    def err(ref):
        return float((got - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny))

    return {"top": err(w_sigma[:r]), "bottom": err(w_sigma[-r:])}


def analyze_pair(w: torch.Tensor, dw: SVD, r: int, method: str | None = None,
                 w_svd: SVD | None = None, seed: int = 0) -> dict:
    """Every number for one (W, dW) pair. ``dw`` is dW's complete SVD: ``svd64`` of the dense
    update or ``lowrank_svd64`` of its factors (all its nonzero singular values either way)."""
    w = w.to(torch.float64)
    if not 1 <= r <= min(w.shape):
        raise ConfigError(f"rank {r} out of range for a {tuple(w.shape)} weight")
    w_svd = w_svd or svd64(w)
    out = {"shape": list(w.shape), "rank": r}
    if not bool((dw.s > 0).any()):
        out.update(zero_delta=True, similarity=None, amplification=None, amplification_projected=None)
    else:
        out["zero_delta"] = False
        out.update(amplification(w, dw, r))
        out["similarity"] = similarity_to_w(w_svd, dw, r)
    out["chance_similarity"] = chance_similarity(tuple(w.shape), r)
    out["w_top_utwv_fro"] = float(w_svd.s[:r].square().sum().sqrt())  # the paper's "W" column
    out["random_utwv_fro"] = random_projected_norm(w, r, seed)
    out["w_fro"] = float(w_svd.s.square().sum().sqrt())
    out["dw_sigma"] = dw.s[: 2 * r].tolist()
    out["w_sigma"] = init_singular_values(w_svd.s, r, method)
    out["w_spectrum"] = w_svd.s.tolist()
    return out
