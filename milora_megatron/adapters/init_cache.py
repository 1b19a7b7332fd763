"""``peft.init_cache``: singular triplets computed once per base, reused by every later run.

Sweeps (learning rates, seeds, methods on one base) would otherwise solve the same
eigenproblems again. What is cached is what the SVD gives, not a method's factors: per
target, its r triplets (sigma, U, V in float64, unsharded, rows in Hugging Face order), under

    DIR/<key>/<hf module name>.safetensors      key = sha256 of (base fingerprint, side, rank, backend)

so one entry serves every method that reads the same side (MiLoRA and MiCA the minor one),
any alpha, any target subset and any TP/PP/DP layout. Nothing in an entry is trusted: its
tensors' sha256 (in the file's metadata) must match, and every rank checks the triplets
against the weight it holds (``||W v - sigma u||`` on its own rows, only r-wide products);
an entry that fails either check, or does not match the shapes, is recomputed and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..subspace import ShardedWeight, Subspace, Which, extract_subspaces

FORMAT = "milora-megatron-init-cache"
VERSION = 1
# ||W v - sigma u|| per triplet, relative to ||W_t||_F: the extraction leaves ~1e-13, any
# other weight O(1). Generous enough for weights stored in bf16 (exact in float64).
RESIDUAL_TOLERANCE = 1e-8
_FIELDS = ("sigma", "u", "v", "degenerate")


def cache_key(fingerprint: str, which: Which, rank: int, backend: str) -> dict:
    return {"format": FORMAT, "version": VERSION, "base_fingerprint": fingerprint, "side": which,
            "rank": rank, "svd_backend": backend}


def entry_dir(root: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(os.path.abspath(root), f"{key['side']}-r{key['rank']}-{digest}")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in _FIELDS:
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def _path(folder: str, name: str) -> str:
    return os.path.join(folder, name + ".safetensors")


def read_entry(folder: str, name: str) -> dict[str, torch.Tensor] | None:
    """The stored triplets of one target, or None when missing, unreadable or not what was
    written (checksum)."""
    path = _path(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in _FIELDS}
    except Exception:  # truncated or not a safetensors file at all
        return None
    if meta.get("format") != FORMAT or meta.get("sha256") != _digest(tensors):
        return None
    return tensors


def write_entry(folder: str, name: str, tensors: dict[str, torch.Tensor], key: dict) -> None:
    """Atomically (a private temporary file renamed into place): concurrent writers of the
    same entry write the same bytes, and a reader never sees half a file."""
    os.makedirs(folder, exist_ok=True)
    key_file = os.path.join(folder, "key.json")
    if not os.path.isfile(key_file):
        tmp = f"{key_file}.{socket.gethostname()}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(key, f, indent=2, sort_keys=True)
        os.replace(tmp, key_file)
    tensors = {k: tensors[k].detach().cpu().contiguous() for k in _FIELDS}
    final = _path(folder, name)
    tmp = f"{final}.{socket.gethostname()}.{os.getpid()}.tmp"
    save_file(tensors, tmp, metadata={"format": FORMAT, "sha256": _digest(tensors)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _local_view(w: ShardedWeight, entry: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> Subspace | None:
    """This rank's view of a stored entry (its rows of the sharded side), None on a shape mismatch."""
    out, inp = w.local.shape
    sigma, u, v, degenerate = (entry[k] for k in _FIELDS)
    rank = sigma.numel()
    if degenerate.shape != (rank,):
        return None
    if w.shard_dim == 0:
        if v.shape != (inp, rank) or u.shape != (out * tp_size, rank):
            return None
        u = u[tp_rank * out : (tp_rank + 1) * out]
    else:
        if u.shape != (out, rank) or v.shape != (inp * tp_size, rank):
            return None
        v = v[tp_rank * inp : (tp_rank + 1) * inp]
    device = w.local.device
    return Subspace(w.name, sigma.to(device), u.to(device), v.to(device), w.shard_dim, degenerate.to(device))


def _consistent(w: ShardedWeight, sub: Subspace) -> bool:
    """Whether the triplets are singular triplets of the weight this rank holds, checked on
    its own rows: W_t v = sigma u_t (rows sharded) or W_t^T u = sigma v_t (columns sharded)."""
    x = w.local.to(torch.float64)
    if sub.shard_dim == 0:
        residual = x @ sub.v - sub.u * sub.sigma
    else:
        residual = x.t() @ sub.u - sub.v * sub.sigma
    scale = max(float(torch.linalg.norm(x)), torch.finfo(torch.float64).tiny)
    return bool(torch.isfinite(residual).all()) and float(residual.norm(dim=0).max()) <= RESIDUAL_TOLERANCE * scale


def _agree(flags: list[bool], groups, device) -> list[bool]:
    """A target counts as cached only if every rank of the TP and DP groups found it good."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float32, device=device)
    for group in groups:
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return [bool(x > 0.5) for x in t.tolist()]


def _gather_full(sub: Subspace, tp_group) -> dict[str, torch.Tensor]:
    """The unsharded entry of one target (collective over TP: only the r-wide derived factor moves)."""
    derived = sub.derived.contiguous()
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    if tp > 1:
        parts = [torch.empty_like(derived) for _ in range(tp)]
        dist.all_gather(parts, derived, group=tp_group)
        derived = torch.cat(parts, dim=0)
    u, v = (derived, sub.v) if sub.shard_dim == 0 else (sub.u, derived)
    return {"sigma": sub.sigma, "u": u, "v": v, "degenerate": sub.degenerate}


def cached_subspaces(root: str, fingerprint: str, weights: list[ShardedWeight], rank: int, which: Which,
                     tp_group=None, dp_group=None, backend: str = "gram", progress: bool = False,
                     stats: dict | None = None) -> list[Subspace]:
    """``extract_subspaces`` through the cache at ``root``: good entries are read, the rest
    solved (split over the ranks as usual) and written by the first TP rank of the first
    replica. Collective like ``extract_subspaces``. ``stats["cache_hits"]`` / ``["cache_misses"]``
    count targets."""
    stats = stats if stats is not None else {}
    key = cache_key(fingerprint, which, rank, backend)
    folder = entry_dir(root, key)
    distributed = dist.is_initialized()
    tp_rank = dist.get_rank(tp_group) if tp_group is not None and distributed else 0
    tp_size = dist.get_world_size(tp_group) if tp_group is not None and distributed else 1
    dp_rank = dist.get_rank(dp_group) if dp_group is not None and dist.is_initialized() else 0
    views: list[Subspace | None] = []
    for w in weights:
        entry = read_entry(folder, w.name)
        view = _local_view(w, entry, tp_rank, tp_size) if entry is not None and entry["sigma"].numel() == rank else None
        views.append(view if view is not None and _consistent(w, view) else None)
    device = weights[0].local.device if weights else torch.device("cpu")
    good = _agree([v is not None for v in views], (tp_group, dp_group), device)
    missing = [i for i, ok in enumerate(good) if not ok]
    # added up: an MoE model's dense targets and experts are two calls
    stats["cache_hits"] = stats.get("cache_hits", 0) + len(weights) - len(missing)
    stats["cache_misses"] = stats.get("cache_misses", 0) + len(missing)
    results: list[Subspace | None] = [views[i] if ok else None for i, ok in enumerate(good)]
    if missing:
        solved = extract_subspaces([weights[i] for i in missing], rank, which, tp_group, dp_group, backend,
                                   progress, stats=stats)
        for i, sub in zip(missing, solved):
            results[i] = sub
            if dp_rank == 0:  # one replica writes; its TP ranks gather the r-wide derived side
                full = _gather_full(sub, tp_group)
                if tp_rank == 0:
                    write_entry(folder, weights[i].name, full, key)
    return results  # type: ignore[return-value]
