#!/usr/bin/env python
"""Our PiSSA and MiCA initialisations against PEFT's own on a real model, at TP=1, each
against a float64 SVD (the table in docs/precision.md). Default model: SmolLM2-135M-Instruct as
`make demo-real` caches it.

    python benchmarks/bench_peft_agreement.py [--hf-dir DIR] [--rank 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from milora_megatron.analysis.init_agreement import agreement, our_initial_factors, peft_initial_factors, reference_svd

DEFAULT = os.path.join(os.path.expanduser("~"), ".cache", "milora-megatron", "smollm2-135m-instruct-bf16")
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _single_process_megatron() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from milora_megatron import compat

    init = tempfile.mktemp(prefix="milora-agree-")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    compat.apply("cpu")
    parallel_state.initialize_model_parallel(1, 1)
    compat.model_parallel_manual_seed(1234)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", default=DEFAULT, help="HF model folder (default: demo-real's SmolLM2 cache)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=1000, help="only the first N layers (default: all)")
    args = p.parse_args()
    if not os.path.isdir(args.hf_dir):
        print(f"{args.hf_dir} does not exist: run `make demo-real` once, or pass --hf-dir", file=sys.stderr)
        return 2
    from safetensors import safe_open
    from milora_megatron.convert.importer import convert_hf_to_megatron

    torch.set_num_threads(os.cpu_count() or 1)
    _single_process_megatron()
    work = tempfile.mkdtemp(prefix="milora-agree-")
    ckpt = convert_hf_to_megatron(args.hf_dir, os.path.join(work, "ckpt"), progress=False)
    weights = {}
    for f in sorted(os.listdir(args.hf_dir)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(args.hf_dir, f), "pt") as h:
                weights.update({k[: -len(".weight")]: h.get_tensor(k).float() for k in h.keys()
                                if any(f".{t}." in k for t in TARGETS)})
    keep = {m for m in weights if int(m.split(".")[2]) < args.layers}
    print(f"model {args.hf_dir}, targets {TARGETS} ({len(keep)} matrices), "
          f"rank {args.rank}, alpha = rank; worst over the matrices, each against a float64 SVD\n")
    print("| method | init | sin largest angle, left (B) | right (A) | singular values, max rel. err | "
          "residual W - sBA, rel. err |\n| --- | --- | --- | --- | --- | --- |")
    refs = {m: reference_svd(weights[m]) for m in sorted(keep)}  # once, for both methods
    for method in ("pissa", "mica"):
        ours = our_initial_factors(ckpt, method, args.rank, float(args.rank), TARGETS)
        peft = peft_initial_factors(args.hf_dir, method, args.rank, float(args.rank), TARGETS)
        table = agreement(refs, {m: ours[m] for m in keep}, {m: peft[m] for m in keep},
                          method, args.rank, 1.0)
        for who, label in (("ours", "ours (fp64 solve, fp32 factors)"), ("peft", "PEFT (fp32 SVD)")):
            row = table[who]
            cells = [f"{row[k]:.1e}" if k in row else "-" for k in ("left_sin", "right_sin", "sigma_rel", "residual_rel")]
            print(f"| {method} | {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
