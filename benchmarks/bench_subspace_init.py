"""Adapter initialisation cost and precision at Llama-3-8B shapes.

Three measurements, printed as markdown tables:
1. time to initialise the paper's targets (q,k,v,up,down) of one decoder layer with our
   distributed Gram/eigh path (here TP=1, one process) against the PEFT-style baseline
   (float32 torch.linalg.svd of every full matrix, as PEFT's pissa/milora init does),
   and the whole-model estimate (x 32 layers);
2. precision of the r smallest singular values / vectors on a Llama-like matrix
   (condition number 1e4, float32 and bfloat16) against a float64 SVD, for our path, the
   plain Gram route without the Rayleigh-Ritz step, and float32 SVD;
3. the residual modes on a bfloat16 layer: relative change of the layer output at
   initialisation when W - s*B0*A0 is written into W ("merge") or W is kept and a frozen
   s*B0*A0 branch is subtracted ("branch"), through the real adapter layer.

    python benchmarks/bench_subspace_init.py            # full Llama-3-8B shapes (minutes on CPU)
    python benchmarks/bench_subspace_init.py --small    # 1/4 of every dimension
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from milora_megatron.subspace import ShardedWeight, extract_subspaces

LLAMA3_8B = {  # HF name: (out, in, shard_dim as megatron splits it)
    "q_proj": (4096, 4096, 0),
    "k_proj": (1024, 4096, 0),
    "v_proj": (1024, 4096, 0),
    "up_proj": (14336, 4096, 0),
    "down_proj": (4096, 14336, 1),
}


def llama_like(out: int, inp: int, cond: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Random singular vectors with a log-spaced spectrum from 1 to 1/cond (no heavy QR on
    the big side: U from a QR of the smaller dimension times a random orthogonal mix)."""
    gen = torch.Generator().manual_seed(seed)
    n = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, n, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return ((u * s) @ v.t()).to(dtype)


def time_init(shapes: dict, rank: int, device: str) -> list[tuple[str, float, float]]:
    rows = []
    for i, (name, (out, inp, shard_dim)) in enumerate(shapes.items()):
        w = (torch.randn(out, inp, generator=torch.Generator().manual_seed(i)) * 0.02).to(torch.bfloat16).to(device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        extract_subspaces([ShardedWeight(name, w, shard_dim)], rank, "minor")
        sync()
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)  # PEFT: full fp32 SVD
        _ = (u[:, -rank:], s[-rank:], vh[-rank:])
        sync()
        peft = time.perf_counter() - t0
        rows.append((f"{name} {out}x{inp}", ours, peft))
        print(f"  {name}: ours {ours:.2f} s, fp32 svd {peft:.2f} s", flush=True)
    return rows


def precision(n: int, rank: int, cond: float, device: str = "cpu") -> list[tuple[str, str, float, float, float]]:
    """Each method on ``device``; the float64 reference SVD on the CPU."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        w = llama_like(n, n, cond, seed=7, dtype=dtype)
        ref_u, ref_s, _ = torch.linalg.svd(w.double())
        ref_u, ref_s = ref_u[:, -rank:], ref_s[-rank:]
        w = w.to(device)
        wd = w.double()

        def report(label, sigma, u, v):
            sigma, u = sigma.cpu(), u.cpu()
            sigma, order = sigma.sort(descending=True)
            rel = ((sigma - ref_s) / ref_s).abs().max().item()
            sin_u = torch.linalg.matrix_norm(u - ref_u @ (ref_u.t() @ u), 2).item()
            orth = (u.t() @ u - torch.eye(rank, dtype=u.dtype)).abs().max().item()
            rows.append((str(dtype).replace("torch.", ""), label, rel, sin_u, orth))

        (sub,) = extract_subspaces([ShardedWeight("w", w, 0)], rank, "minor")
        report("ours: fp64 Gram + eigh + Rayleigh-Ritz", sub.sigma, sub.u, sub.v)
        # Plain Gram route: sigma from the Gram eigenvalues, U = W V / sigma, no refinement.
        vals, vecs = torch.linalg.eigh(wd.t() @ wd)
        vals, vecs = vals[:rank].flip(0), vecs[:, :rank].flip(1)
        sig = vals.clamp_min(0).sqrt()
        report("fp64 Gram + eigh, U = W V / sigma", sig, (wd @ vecs) / sig, vecs)
        u32, s32, vh32 = torch.linalg.svd(w.float())
        report("fp32 torch.linalg.svd (PEFT)", s32[-rank:].double(), u32[:, -rank:].double(), vh32[-rank:].t().double())
    return rows


def residual_modes(n: int, rank: int, cond: float) -> list[tuple[str, float]]:
    """Relative output change at init of a bf16 ColumnParallelLinear, TP=1, via the real layers."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from milora_megatron import compat
    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.adapters.apply import adapt_linear

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)
        compat.apply("cpu")  # this measurement runs on the CPU layer path
        ps.initialize_model_parallel(1, 1)
    cfg = TransformerConfig(num_layers=1, hidden_size=n, num_attention_heads=8, use_cpu_initialization=True,
                            params_dtype=torch.bfloat16, bf16=True, gradient_accumulation_fusion=False)
    w = llama_like(n, n, cond, seed=9, dtype=torch.bfloat16)
    x = torch.randn(256, 1, n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    rows = []
    # For scale: the whole minor part's contribution to the output.
    u, sv, vh = torch.linalg.svd(w.double())
    minor = (x.double() @ (vh[-rank:].t() * sv[-rank:]) @ u[:, -rank:].t()).norm()
    rows.append(("(size of the minor part's output, for scale)", (minor / (x.double() @ w.double().t()).norm()).item()))
    for mode in ("merge", "branch"):
        layer = ColumnParallelLinear(n, n, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                                     gather_output=False, skip_bias_add=True)
        with torch.no_grad():
            layer.weight.copy_(w)
            base, _ = layer(x)
        adapt_linear(layer, "q_proj", AdapterConfig(method="milora", rank=rank, residual=mode, targets=["q_proj"], dropout=0.0))
        with torch.no_grad():
            out, _ = layer(x)
        rel = ((out.float() - base.float()).norm() / base.float().norm()).item()
        rows.append((mode, rel))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="divide every Llama-3-8B dimension by 4")
    parser.add_argument("--rank", type=int, default=32, help="adapter rank r (paper: 32)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers for the whole-model estimate")
    parser.add_argument("--precision-size", type=int, default=1024, help="n of the n x n precision matrix")
    parser.add_argument("--cond", type=float, default=1e4, help="condition number of the Llama-like matrices")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-timing", action="store_true", help="only the precision and residual tables")
    args = parser.parse_args()
    shapes = {k: (o // 4, i // 4, d) if args.small else (o, i, d) for k, (o, i, d) in LLAMA3_8B.items()}
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} rank={args.rank}")

    if not args.skip_timing:
        print("\n## Initialisation time, paper targets, one decoder layer" + (" (--small)" if args.small else ""))
        rows = time_init(shapes, args.rank, args.device)
        print("| matrix | ours (fp64 Gram + eigh) s | PEFT-style fp32 SVD s | ratio |\n| --- | --- | --- | --- |")
        for name, ours, peft in rows:
            print(f"| {name} | {ours:.2f} | {peft:.2f} | {peft / ours:.1f}x |")
        tot_o, tot_p = sum(r[1] for r in rows), sum(r[2] for r in rows)
        print(f"| one layer | {tot_o:.2f} | {tot_p:.2f} | {tot_p / tot_o:.1f}x |")
        print(f"| whole model estimate (x{args.layers}) | {tot_o * args.layers:.0f} | {tot_p * args.layers:.0f} | |")

    print(f"\n## Precision, bottom {args.rank} of a {args.precision_size}^2 matrix, cond {args.cond:g}, vs float64 SVD")
    print("| input | method | max rel err sigma | sin(theta) U | max abs(U^T U - I) |\n| --- | --- | --- | --- | --- |")
    for dtype, label, rel, sin_u, orth in precision(args.precision_size, args.rank, args.cond):
        print(f"| {dtype} | {label} | {rel:.1e} | {sin_u:.1e} | {orth:.1e} |")

    print(f"\n## Residual modes, bf16 {args.precision_size}^2 layer, MiLoRA r={args.rank}: relative output change at init")
    print("| mode | rel. change of W x |\n| --- | --- |")
    for mode, rel in residual_modes(args.precision_size, args.rank, args.cond):
        print(f"| {mode} | {rel:.2e} |")


if __name__ == "__main__":
    main()
