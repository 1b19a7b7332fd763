"""Distributed extraction of the r smallest (or largest) singular triplets of TP-sharded weights.

A tensor-parallel weight is split along one side: ColumnParallelLinear splits the output
rows (``shard_dim=0``), RowParallelLinear the input columns (``shard_dim=1``). The other
side is whole on every rank, and its float64 Gram matrix is a plain sum of per-rank
Grams. So, per matrix:

1. every rank forms its float64 Gram of the unsharded side; a ``reduce`` sums them on ONE
   owner rank (owners round-robin over the TP ranks, matrices round-robin over the
   data-parallel replicas, so eigensolves are split, never repeated);
2. the owner solves only the r wanted eigenpairs and broadcasts the r-wide basis. Matrices
   go through these steps in phases (all reductions, then every owner's solves at once,
   then the broadcasts), chunked so the Grams an owner holds stay within a budget: the
   owners work at the same time instead of one after another;
3. every rank projects its own shard onto it (``P_t = W_t V``, r-wide); a Rayleigh-Ritz
   step (a TSQR of P: each rank's r x r R factor is gathered by the owner, whose small
   SVD gives the rotation) fixes the singular values and the basis inside the subspace.
   This works on W itself rather than on its square, so the smallest singular values come
   out accurate to ~1e-13 relative instead of the Gram's ~eps * cond^2.

No rank ever sees another rank's shard of W: only Grams of the unsharded side (summed),
r-wide bases and r x r matrices travel. ``backend="exact"`` instead gathers the whole
matrix and runs a float64 ``torch.linalg.svd`` (for tests and debugging only).

Conventions (identical at every TP size): singular values in descending order; each
vector of the unsharded side has its largest-magnitude entry positive (ties: first
index). Singular values below ``n * eps * sigma_max`` (what a float64 Gram can resolve)
are reported as exactly 0; their derived vectors are 0 unless an orthonormal basis is
asked for (``left_orthonormal``), where they are completed deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.distributed as dist

from .errors import ConfigError

Which = Literal["minor", "principal"]
_EPS64 = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class ShardedWeight:
    """One weight as this rank holds it; ``shard_dim`` is the side split over the TP group."""

    name: str
    local: torch.Tensor
    shard_dim: int  # 0: output rows split (ColumnParallel), 1: input columns split (RowParallel)


@dataclass
class Subspace:
    """r singular triplets of one weight, as seen by one TP rank (float64).

    ``u`` is this rank's rows of U when rows are sharded (else all of U), ``v`` likewise for
    V; ``sigma`` is replicated, descending.
    """

    name: str
    sigma: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    shard_dim: int
    degenerate: torch.Tensor  # bool (r,): sigma below the resolution floor

    @property
    def derived(self) -> torch.Tensor:
        """The factor each rank computed locally from the broadcast one."""
        return self.u if self.shard_dim == 0 else self.v


def _from_sides(name, sigma, derived, unsharded, shard_dim, degenerate) -> Subspace:
    """Place the locally derived (sharded-side) and the replicated vectors as U and V."""
    if shard_dim == 0:
        return Subspace(name, sigma, derived, unsharded, 0, degenerate)
    return Subspace(name, sigma, unsharded, derived, 1, degenerate)


def _world(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _global_rank(group, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def full_shape(w: ShardedWeight, tp_size: int) -> tuple[int, int]:
    out, inp = w.local.shape
    return (out * tp_size, inp) if w.shard_dim == 0 else (out, inp * tp_size)


def check_rank(w: ShardedWeight, rank: int, tp_size: int) -> None:
    out, inp = full_shape(w, tp_size)
    if not 0 < rank <= min(out, inp):
        raise ConfigError(
            f"adapter rank {rank} is invalid for {w.name}: its weight is {out} x {inp}, "
            f"so the rank must be between 1 and {min(out, inp)}"
        )


def _eigh_range(gram: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs lo..hi-1 (ascending) of a symmetric float64 matrix.

    On CPU LAPACK's subset driver skips most of the eigenvector work (4.5x faster at 4096
    on 2 cores); on GPU the full ``torch.linalg.eigh`` is already fast.
    """
    if gram.device.type == "cpu":
        try:
            import scipy.linalg
        except ImportError:  # pragma: no cover - scipy is a declared dependency
            scipy = None
        else:
            vals, vecs = scipy.linalg.eigh(
                gram.numpy(), subset_by_index=[lo, hi - 1], driver="evr", check_finite=False
            )
            return torch.from_numpy(vals), torch.from_numpy(vecs)
    vals, vecs = torch.linalg.eigh(gram)
    return vals[lo:hi], vecs[:, lo:hi]


def _sign_fix(vectors: torch.Tensor) -> torch.Tensor:
    """+1/-1 per column making each column's largest-magnitude entry positive."""
    idx = vectors.abs().argmax(dim=0)
    pivots = vectors.gather(0, idx.unsqueeze(0)).squeeze(0)
    return torch.where(pivots < 0, -1.0, 1.0).to(vectors.dtype)


def _selection(n_unsharded: int, n_nonzero: int, rank: int, which: Which) -> tuple[int, int]:
    # The Gram of the unsharded side has n_unsharded - n_nonzero structural zeros at the bottom.
    if which == "principal":
        return n_unsharded - rank, n_unsharded
    lo = n_unsharded - n_nonzero
    return lo, lo + rank


def _oriented(local: torch.Tensor, shard_dim: int) -> torch.Tensor:
    """The shard with the sharded side as rows: W_t for column-, W_t^T for row-parallel."""
    return local if shard_dim == 0 else local.t()


@dataclass
class _Job:
    """One matrix: where it goes (owner), and which side its Gram is taken on."""

    index: int
    weight: ShardedWeight
    owner: int  # TP rank that reduces the Gram and solves the eigenproblem
    flip: bool  # TP=1 only: the Gram is taken on the smaller side
    n_unsharded: int
    n_nonzero: int

    def x(self) -> torch.Tensor:
        """This rank's shard, float64, sharded side as rows (recomputed, not kept: at 8B one
        float64 copy of up_proj is 470 MB)."""
        x = _oriented(self.weight.local, self.weight.shard_dim).to(torch.float64)
        return x.t() if self.flip else x

    def key(self) -> tuple:
        """Matrices of one key go through the phases as one batch: the same owner and shapes."""
        return (self.owner, self.flip, tuple(self.weight.local.shape), self.weight.shard_dim, self.weight.local.device)


def _job(index: int, w: ShardedWeight, owner: int, tp_size: int) -> _Job:
    rows, cols = _oriented(w.local, w.shard_dim).shape
    # Unsharded (TP=1), either side may hold the Gram: take the smaller one (k_proj 1024 x 4096:
    # a 1024^2 eigenproblem instead of 4096^2). The sign convention stays on the usual side.
    flip = tp_size == 1 and rows < cols
    if flip:
        rows, cols = cols, rows
    return _Job(index, w, owner, flip, n_unsharded=cols, n_nonzero=min(rows * tp_size, cols))


@dataclass
class _Batch:
    """Same-shaped matrices of one owner, stacked: every phase is one batched product, one
    factorisation and one collective for all of them (an MoE layer's experts: hundreds of
    matrices of one shape per rank)."""

    jobs: list[_Job]
    gram: torch.Tensor | None = None  # (B, n, n), on the owner between phases 1 and 2
    basis: torch.Tensor | None = None  # (B, n, r)
    top_sq: torch.Tensor | None = None  # (B,)
    proj: torch.Tensor | None = None  # (B, m, r)
    stack: list | None = None

    @property
    def lead(self) -> _Job:
        return self.jobs[0]

    def x(self) -> torch.Tensor:
        """(B, m, n): the stacked float64 shards, recomputed when needed (see ``_Job.x``)."""
        return torch.stack([j.x() for j in self.jobs])


def _batches(jobs: list[_Job], budget_bytes: int) -> list[_Batch]:
    """A chunk's jobs grouped by key (owner, shapes) in the order keys first appear (the same
    on every rank), each batch's float64 shards within ``budget_bytes``."""
    groups: dict[tuple, list[_Job]] = {}
    for j in jobs:
        groups.setdefault(j.key(), []).append(j)
    out = []
    for same in groups.values():
        per_batch = max(1, budget_bytes // (same[0].weight.local.numel() * 8))
        out += [_Batch(same[i : i + per_batch]) for i in range(0, len(same), per_batch)]
    return out


def _solve(gram: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs lo..hi-1 of each of a batch of symmetric float64 matrices: on a GPU one
    batched ``torch.linalg.eigh``; on the CPU LAPACK's subset driver per matrix, which is
    faster there than a batched full solve (``_eigh_range``)."""
    if gram.device.type != "cpu":
        vals, vecs = torch.linalg.eigh(gram)
        return vals[:, lo:hi], vecs[:, :, lo:hi]
    pairs = [_eigh_range(g, lo, hi) for g in gram]
    return torch.stack([v for v, _ in pairs]), torch.stack([u for _, u in pairs])


def _sign_fix_batched(vectors: torch.Tensor) -> torch.Tensor:
    """``_sign_fix`` of each matrix of a (B, n, r) batch: (B, r) of +1/-1."""
    idx = vectors.abs().argmax(dim=1, keepdim=True)
    pivots = vectors.gather(1, idx).squeeze(1)
    return torch.where(pivots < 0, -1.0, 1.0).to(vectors.dtype)


def _extract_grams(jobs: list[_Job], rank: int, which: Which, group, stats: dict,
                   batch_bytes: int | None = None) -> dict[int, Subspace]:
    """One chunk of matrices, in phases, so that the owners solve at the same time:

    1. every Gram is reduced to its owner (communication only);
    2. every owner solves its own eigenproblems - all owners at once, no collective between;
    3. the r-wide bases go out;
    4. every rank projects its shard and its r x r R factor goes to the owner;
    5. the owners' small SVDs (Rayleigh-Ritz), whose rotation and sigma go out.
    Within a phase the matrices are taken in the same order on every rank, same-shaped ones
    of one owner as one batch (``_Batch``)."""
    tp_size, tp_rank = _world(group)
    batches = _batches(jobs, batch_bytes or BATCH_BYTES)
    src = {id(b): _global_rank(group, b.lead.owner) for b in batches}
    pending = None  # 1: each reduction overlaps the next Gram's product (one in flight)
    for b in batches:
        x = b.x()
        gram = x.transpose(1, 2) @ x
        del x
        if tp_size > 1:
            handle = dist.reduce(gram, dst=src[id(b)], group=group, async_op=True)
            if pending is not None:
                pending[0].wait()
            pending = (handle, gram)  # the tensor stays referenced until its reduction is done
        if b.lead.owner == tp_rank:
            b.gram = gram
    if pending is not None:
        pending[0].wait()
    for b in batches:  # 2
        j = b.lead
        b.basis = torch.empty(len(b.jobs), j.n_unsharded, rank, dtype=torch.float64, device=j.weight.local.device)
        if j.owner == tp_rank:
            lo, hi = _selection(j.n_unsharded, j.n_nonzero, rank, which)
            vals, vecs = _solve(b.gram, lo, hi)
            b.basis.copy_(vecs.to(b.basis.device))
            # An upper bound of sigma_max^2 for the resolution floor: trace(G) for the minor
            # end (its top eigenvalue was not computed), the top eigenvalue otherwise.
            b.top_sq = b.gram.diagonal(dim1=1, dim2=2).sum(-1) if which == "minor" else vals[:, -1].clone()
            b.gram = None
            stats["eigensolves"] = stats.get("eigensolves", 0) + len(b.jobs)
    if tp_size > 1:  # 3
        for handle in [dist.broadcast(b.basis, src=src[id(b)], group=group, async_op=True) for b in batches]:
            handle.wait()
    for b in batches:  # 4: Rayleigh-Ritz through a TSQR, so nothing is squared again
        b.proj = b.x() @ b.basis  # (B, n_sharded_local, r): this rank's rows of (U Sigma)
        r_local = torch.zeros(len(b.jobs), rank, rank, dtype=torch.float64, device=b.proj.device)
        r_fact = torch.linalg.qr(b.proj, mode="r").R
        r_local[:, : r_fact.shape[1]] = r_fact
        if tp_size > 1:
            b.stack = [torch.empty_like(r_local) for _ in range(tp_size)] if b.lead.owner == tp_rank else None
            dist.gather(r_local, b.stack, dst=src[id(b)], group=group)
        else:
            b.stack = [r_local]
    out = {}
    for b in batches:  # 5: the owner's small SVD gives the singular values of W V itself
        j = b.lead
        packet = torch.empty(len(b.jobs), rank, rank + 1, dtype=torch.float64, device=b.proj.device)  # [rot | sigma]
        if j.owner == tp_rank:
            _, sigma, rot_h = torch.linalg.svd(torch.cat(b.stack, dim=1), full_matrices=False)  # descending
            rot = rot_h.transpose(1, 2)
            rot = rot * _sign_fix_batched(b.basis @ rot).unsqueeze(1)
            floor = (j.n_unsharded * _EPS64 * b.top_sq.clamp(min=0.0).sqrt()).to(sigma.dtype).unsqueeze(1)
            packet[:, :, :rank] = rot
            packet[:, :, rank] = torch.where(sigma <= floor, torch.zeros_like(sigma), sigma)
        if tp_size > 1:
            dist.broadcast(packet, src=src[id(b)], group=group)
        rots, sigmas = packet[:, :, :rank], packet[:, :, rank]
        unsharded_all = b.basis @ rots
        derived_all = b.proj @ rots
        for k, job in enumerate(b.jobs):
            sigma = sigmas[k].clone()
            degenerate = sigma == 0
            unsharded_vecs = unsharded_all[k]
            derived = derived_all[k] / torch.where(degenerate, 1.0, sigma)
            derived[:, degenerate] = 0.0
            if job.flip:
                signs = _sign_fix(derived)
                unsharded_vecs, derived = derived * signs, unsharded_vecs * signs
            out[job.index] = _from_sides(job.weight.name, sigma, derived.contiguous(), unsharded_vecs.contiguous(),
                                         job.weight.shard_dim, degenerate)
        b.proj = b.stack = b.basis = None
    return out


def _chunks(jobs: list[_Job], tp_size: int, budget_bytes: int) -> list[list[_Job]]:
    """Consecutive jobs grouped so that no owner holds more than ``budget_bytes`` of Grams at
    once (at least one each): at TP=8 an owner would otherwise hold 20 float64 4096^2 Grams."""
    chunks, current, held = [], [], [0] * tp_size
    for j in jobs:
        size = j.n_unsharded ** 2 * 8
        if current and held[j.owner] + size > budget_bytes:
            chunks.append(current)
            current, held = [], [0] * tp_size
        current.append(j)
        held[j.owner] += size
    if current:
        chunks.append(current)
    return chunks


def _extract_exact(w: ShardedWeight, rank: int, which: Which, group) -> Subspace:
    """Reference: gather the whole matrix and take a float64 SVD. Tests/debugging only."""
    tp_size, tp_rank = _world(group)
    x = _oriented(w.local, w.shard_dim).to(torch.float64)
    if tp_size > 1:
        parts = [torch.empty_like(x) for _ in range(tp_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        full = torch.cat(parts, 0)
    else:
        full = x
    u, s_all, vh = torch.linalg.svd(full, full_matrices=False)
    n = s_all.numel()
    sel = slice(0, rank) if which == "principal" else slice(n - rank, n)
    u, s, v = u[:, sel], s_all[sel], vh[sel].t()
    signs = _sign_fix(v)
    u, v = u * signs, v * signs
    rows = x.shape[0]
    u_local = u[tp_rank * rows : (tp_rank + 1) * rows].clone()
    degenerate = s <= full.shape[1] * _EPS64 * float(s_all[0])
    s = torch.where(degenerate, torch.zeros_like(s), s)
    u_local[:, degenerate] = 0.0
    return _from_sides(w.name, s, u_local, v, w.shard_dim, degenerate)


GRAM_BUDGET_BYTES = 1 << 30  # float64 Grams an owner holds at once (a 4096^2 one is 128 MiB)
BATCH_BYTES = 1 << 28  # float64 shards stacked into one batch (32 experts of 768 x 2048 at 12 MiB each)


@torch.no_grad()
def extract_subspaces(
    weights: Sequence[ShardedWeight],
    rank: int,
    which: Which,
    tp_group=None,
    dp_group=None,
    backend: Literal["gram", "exact"] = "gram",
    progress: bool = False,
    stats: dict | None = None,
    gram_budget_bytes: int = GRAM_BUDGET_BYTES,
) -> list[Subspace]:
    """r singular triplets for each weight, every TP rank receiving its own view.

    Collective over ``tp_group`` (and ``dp_group`` when given): every rank of both must call
    it with the same list of weights in the same order. The matrices are split over the
    data-parallel replicas, each replica's over its TP ranks as owners, and the owners solve
    at the same time (see ``_extract_grams``). ``stats["eigensolves"]`` counts this rank's.
    """
    tp_size, _ = _world(tp_group)
    dp_size, dp_rank = _world(dp_group)
    stats = stats if stats is not None else {}
    stats.setdefault("eigensolves", 0)
    for w in weights:
        if w.local.dim() != 2 or w.shard_dim not in (0, 1):
            raise ValueError(f"{w.name}: expected a 2-D shard with shard_dim 0 or 1")
        check_rank(w, rank, tp_size)
    if backend not in ("gram", "exact"):
        raise ValueError(f"unknown subspace backend {backend!r} (expected 'gram' or 'exact')")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(weights), desc=f"{which} subspaces (r={rank})", unit="matrix")
    results: list[Subspace | None] = [None] * len(weights)
    mine = [i for i in range(len(weights)) if i % dp_size == dp_rank]
    if backend == "exact":
        for i in mine:
            results[i] = _extract_exact(weights[i], rank, which, tp_group)
            stats["eigensolves"] += 1
            if bar is not None:
                bar.update(dp_size)
    else:
        jobs = [_job(i, weights[i], (i // dp_size) % tp_size, tp_size) for i in mine]
        for chunk in _chunks(jobs, tp_size, gram_budget_bytes):
            for index, sub in _extract_grams(chunk, rank, which, tp_group, stats).items():
                results[index] = sub
            if bar is not None:
                bar.update(len(chunk) * dp_size)
    if dp_size > 1:
        results = _share_over_replicas(weights, results, rank, dp_group)
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def _share_over_replicas(weights, results, rank, dp_group) -> list[Subspace]:
    """Each replica computed a disjoint set of matrices; hand every replica all of them.

    Per matrix, the replica that computed it broadcasts this TP rank's r-wide factors.
    """
    dp_size, _ = _world(dp_group)
    shared = []
    for i, w in enumerate(weights):
        src = _global_rank(dp_group, i % dp_size)
        x = _oriented(w.local, w.shard_dim)
        n_sharded_local, n_unsharded = x.shape
        packet = torch.empty(n_sharded_local + n_unsharded + 2, rank, dtype=torch.float64, device=x.device)
        mine = results[i]
        if mine is not None:
            packet[:n_sharded_local] = mine.derived
            packet[n_sharded_local:-2] = mine.v if w.shard_dim == 0 else mine.u
            packet[-2] = mine.sigma
            packet[-1] = mine.degenerate.to(torch.float64)
        dist.broadcast(packet, src=src, group=dp_group)
        derived, unsharded = packet[:n_sharded_local], packet[n_sharded_local:-2]
        sigma, degenerate = packet[-2].clone(), packet[-1].bool()
        shared.append(_from_sides(w.name, sigma, derived, unsharded, w.shard_dim, degenerate))
    return shared


@torch.no_grad()
def left_orthonormal(sub: Subspace, tp_group=None, seed: int = 0) -> torch.Tensor:
    """This rank's rows of an exactly orthonormal U (needed where U itself is the factor).

    When U was derived locally (rows sharded) it is re-orthonormalised with a distributed
    CholeskyQR2 (only r x r matrices travel); degenerate columns (sigma == 0, where U is not
    determined by W) are first filled with a seeded vector that is the same at any TP size.
    Columns are kept in order, so each non-degenerate column stays in its own direction.
    """
    degenerate = bool(sub.degenerate.any())
    if sub.shard_dim == 1 and not degenerate:
        return sub.u  # U came from the eigensolver: orthonormal already
    # Only a row-sharded U needs the TP group; a replicated U is completed identically everywhere.
    tp_size, tp_rank = _world(tp_group) if sub.shard_dim == 0 else (1, 0)
    u = sub.u.clone()
    if degenerate:
        rows = u.shape[0]
        gen = torch.Generator().manual_seed(seed)
        filler = torch.randn(rows * tp_size, int(sub.degenerate.sum()), generator=gen, dtype=torch.float64)
        u[:, sub.degenerate] = filler[tp_rank * rows : (tp_rank + 1) * rows].to(u.device)
    for _ in range(2):  # CholeskyQR2: the second pass restores orthogonality to eps
        gram = u.t() @ u
        if tp_size > 1:
            dist.all_reduce(gram, group=tp_group)
        chol = torch.linalg.cholesky(gram)
        u = torch.linalg.solve_triangular(chol, u.t(), upper=False).t()
    return u
