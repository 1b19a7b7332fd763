"""Distributed subspace extraction on real gloo ranks vs the single-process result."""

import pytest
import torch
from distributed import run_distributed
from tiny import spectral_matrix

from milora_megatron.subspace import ShardedWeight, extract_subspaces

R = 6
SHAPES = {"col": (96, 64, 0), "row": (64, 96, 1), "wide": (32, 128, 0)}


def _full_matrices():
    gen = torch.Generator().manual_seed(11)
    return {k: spectral_matrix(o, i, cond=1e4, gen=gen) for k, (o, i, _) in SHAPES.items()}


def _local(w, shard_dim, tp, rank):
    n = w.shape[shard_dim] // tp
    return w.narrow(shard_dim, rank * n, n).clone()


def _worker(which):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    sent = []
    originals = {name: getattr(dist, name) for name in ("reduce", "broadcast", "gather", "all_reduce", "all_gather")}

    def recorder(name):
        def call(tensor, *args, **kwargs):
            sent.append((name, tuple(tensor.shape)))
            return originals[name](tensor, *args, **kwargs)
        return call

    for name in originals:
        setattr(dist, name, recorder(name))
    try:
        weights = [ShardedWeight(k, _local(w, SHAPES[k][2], tp, rank), SHAPES[k][2]) for k, w in _full_matrices().items()]
        subs = extract_subspaces(weights, R, which, ps.get_tensor_model_parallel_group(),
                                 ps.get_data_parallel_group())
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return {"subs": {s.name: (s.sigma, s.u, s.v) for s in subs}, "sent": sent}


def _gathered(results, tp):
    """Reassemble each matrix's factors from the ranks of data-parallel replica 0."""
    out = {}
    for name, (_, _, shard_dim) in SHAPES.items():
        per_rank = [r["subs"][name] for r in results[:tp]]
        sigma = per_rank[0][0]
        if shard_dim == 0:
            u, v = torch.cat([p[1] for p in per_rank]), per_rank[0][2]
        else:
            u, v = per_rank[0][1], torch.cat([p[2] for p in per_rank])
        out[name] = (sigma, u, v)
    return out


@pytest.mark.parametrize("world,tp", [(2, 2), (4, 4), (4, 2)])
@pytest.mark.parametrize("which", ["minor", "principal"])
def test_factors_independent_of_tp_and_only_r_wide_traffic(world, tp, which):
    reference = {}
    for name, w in _full_matrices().items():
        (s,) = extract_subspaces([ShardedWeight(name, w, SHAPES[name][2])], R, which)
        reference[name] = (s.sigma, s.u, s.v)
    results = run_distributed(_worker, world=world, tp=tp, which=which)
    got = _gathered(results, tp)
    for name in SHAPES:
        for a, b in zip(got[name], reference[name]):
            assert (a - b).abs().max() <= 1e-6, name
    # Every replica holds identical factors (DP replicas computed disjoint matrices).
    for r in range(tp, world):
        for name in SHAPES:
            for a, b in zip(results[r]["subs"][name], results[r % tp]["subs"][name]):
                assert torch.equal(a, b)
    # Traffic: Grams of the unsharded side, or tensors r wide (batches of them: a leading
    # dim counts the same-shaped matrices of one owner). Never a shard of W.
    for result in results:
        for op, shape in result["sent"]:
            square_gram = len(shape) >= 2 and shape[-1] == shape[-2] and shape[-1] in (64, 128)
            assert square_gram or shape[-1] in (R, R + 1), (op, shape)


def _phases_worker(n_mats):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from milora_megatron import subspace

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    events = []
    originals = {name: getattr(dist, name) for name in ("reduce", "broadcast", "gather")}
    solve = subspace._eigh_range

    def recorder(name):
        def call(tensor, *args, **kwargs):
            events.append(name)
            return originals[name](tensor, *args, **kwargs)
        return call

    for name in originals:
        setattr(dist, name, recorder(name))
    subspace._eigh_range = lambda *a, **k: (events.append("solve"), solve(*a, **k))[1]
    try:
        gen = torch.Generator().manual_seed(3)
        full = [spectral_matrix(48, 32, cond=100.0, gen=gen) for _ in range(n_mats)]
        weights = [ShardedWeight(f"m{i}", _local(w, 0, tp, rank), 0) for i, w in enumerate(full)]
        stats = {}
        subspace.extract_subspaces(weights, 4, "minor", ps.get_tensor_model_parallel_group(),
                                   ps.get_data_parallel_group(), stats=stats)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        subspace._eigh_range = solve
    return {"events": events, "eigensolves": stats["eigensolves"], "dp": ps.get_data_parallel_world_size()}


@pytest.mark.parametrize("world,tp", [(2, 2), (4, 2)])
def test_owners_solve_at_the_same_time_and_never_twice(world, tp):
    """Counts, not timings: every matrix is solved once in the whole job (split over TP
    owners and DP replicas), and on each rank all Gram reductions come before its solves,
    which come before any basis broadcast: no owner waits for another owner's eigensolve.
    Same-shaped matrices of one owner travel as one batch: one reduction, broadcast and
    gather per owner here, however many matrices."""
    n = 8
    results = run_distributed(_phases_worker, world=world, tp=tp, n_mats=n)
    assert sum(r["eigensolves"] for r in results) == n  # never repeated
    per_replica = n // (world // tp)
    batches = tp  # every matrix has the same shape: one batch per owner
    for r in results:
        assert r["eigensolves"] == per_replica // tp  # split evenly over the owners
        ev = r["events"]
        first_solve = ev.index("solve")
        last_solve = len(ev) - 1 - ev[::-1].index("solve")
        assert ev[:first_solve] == ["reduce"] * batches  # phase 1: every Gram to its owner
        assert ev[first_solve : last_solve + 1] == ["solve"] * (per_replica // tp)  # phase 2: back to back
        tail = ev[last_solve + 1 :]
        assert tail[:batches] == ["broadcast"] * batches and tail.count("gather") == batches
