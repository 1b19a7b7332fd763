"""peft.init_cache on one process: a second pass solves nothing and gives the same bits; a
damaged, truncated or stale entry is recomputed, never trusted."""

import os

import torch
from tiny import spectral_matrix

from milora_megatron.adapters.init_cache import cache_key, cached_subspaces, entry_dir
from milora_megatron.subspace import ShardedWeight, extract_subspaces

R = 5


def _weights(seed=3):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.self_attn.q_proj": (48, 32, 0), "model.layers.0.mlp.down_proj": (32, 64, 1)}
    return [ShardedWeight(n, spectral_matrix(o, i, cond=1e4, gen=gen).float(), d) for n, (o, i, d) in shapes.items()]


def _run(root, weights, which="minor", fingerprint="base-A"):
    stats = {}
    subs = cached_subspaces(str(root), fingerprint, weights, R, which, stats=stats)
    return subs, stats


def _same(a, b):
    return all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b) for f in ("sigma", "u", "v", "degenerate"))


def test_second_run_reads_the_cache_bit_identically(tmp_path):
    weights = _weights()
    first, stats = _run(tmp_path, weights)
    assert stats == {"eigensolves": 2, "cache_hits": 0, "cache_misses": 2}
    reference = extract_subspaces(weights, R, "minor")  # no cache at all
    assert _same(first, reference)
    second, stats = _run(tmp_path, weights)
    assert stats == {"cache_hits": 2, "cache_misses": 0} and _same(second, reference)
    # the other side, another rank or another base is another entry
    _, stats = _run(tmp_path, weights, which="principal")
    assert stats["cache_misses"] == 2
    _, stats = _run(tmp_path, weights, fingerprint="base-B")
    assert stats["cache_misses"] == 2


def _file(root, name, fingerprint="base-A"):
    return os.path.join(entry_dir(str(root), cache_key(fingerprint, "minor", R, "gram")), name + ".safetensors")


def test_damaged_truncated_and_stale_entries_are_recomputed(tmp_path):
    weights = _weights()
    reference, _ = _run(tmp_path, weights)
    q, down = (_file(tmp_path, w.name) for w in weights)
    data = bytearray(open(q, "rb").read())
    data[-9] ^= 0x10  # one bit of U: the checksum catches it
    open(q, "wb").write(bytes(data))
    open(down, "r+b").truncate(os.path.getsize(down) // 2)
    subs, stats = _run(tmp_path, weights)
    assert stats["cache_misses"] == 2 and stats["eigensolves"] == 2 and _same(subs, reference)
    _, stats = _run(tmp_path, weights)
    assert stats["cache_hits"] == 2  # rewritten good

    # stale: same fingerprint, other weights (a base rewritten in place): the residual check catches it
    other = _weights(seed=4)
    subs, stats = _run(tmp_path, other)
    assert stats["cache_misses"] == 2 and _same(subs, extract_subspaces(other, R, "minor"))
