"""How the subspace initialisation scales with the ranks it runs on.

The same matrices (default 8 of 1536 x 1536, r = 16, column-parallel) extracted at TP=1
(one process), TP=2 (two processes) and TP=2 x DP=2 (four processes), one thread per
process; the ideal is serial time / (TP x DP) plus communication. Prints the times, the
ratios to TP=1 and each rank's eigensolve count.

    python benchmarks/bench_init_scaling.py [--matrices 8 --size 1536 --rank 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

CONFIGS = [(1, 1), (2, 2), (4, 2)]  # (processes, TP); the rest is DP


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from milora_megatron.subspace import ShardedWeight, extract_subspaces
    from milora_megatron.train.parallel import init_distributed

    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"), args.tp, 1, seed=0)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(0)
    n = args.size
    weights = []
    for i in range(args.matrices):
        w = torch.randn(n, n, generator=gen) * 0.02
        rows = n // tp
        weights.append(ShardedWeight(f"m{i}", w[rank * rows : (rank + 1) * rows].clone(), 0))
    dist.barrier()
    start = time.perf_counter()
    stats = {}
    extract_subspaces(weights, args.rank, "minor", ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group(),
                      stats=stats)
    dist.barrier()
    seconds = time.perf_counter() - start
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, stats["eigensolves"])
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"seconds": seconds, "eigensolves": counts}, f)
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrices", type=int, default=8, help="number of matrices")
    p.add_argument("--size", type=int, default=1536, help="n of the n x n matrices")
    p.add_argument("--rank", type=int, default=16, help="r")
    p.add_argument("--tp", type=int, default=None, help=argparse.SUPPRESS)  # worker mode (under torchrun)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tp is not None:
        worker(args)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs, tp in CONFIGS:
            out = os.path.join(tmp, f"{procs}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                   __file__, "--matrices", str(args.matrices), "--size", str(args.size), "--rank", str(args.rank),
                   "--tp", str(tp), "--out", out]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append((procs, tp, json.load(open(out))))
    base = rows[0][2]["seconds"]
    print(f"{args.matrices} matrices {args.size} x {args.size}, r = {args.rank}, one thread per process, "
          f"{os.cpu_count()} cores\n")
    print("| processes | TP x DP | init time (s) | / TP=1 | eigensolves per rank |")
    print("|---|---|---|---|---|")
    for procs, tp, r in rows:
        print(f"| {procs} | {tp} x {procs // tp} | {r['seconds']:.2f} | {r['seconds'] / base:.2f} | "
              f"{', '.join(map(str, r['eigensolves']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
