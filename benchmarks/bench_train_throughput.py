"""Training throughput of the adapter methods through the real trainer.

A Llama-3-8B-shaped model with random weights (megatron's own init; nothing is loaded or
converted), the paper's targets (q,k,v,up,down) at rank 32, seq 2048, global batch 16, and
random tokens with the loss on every token. For each method the same ``Trainer`` that
``launch/pretrain_milora.py`` runs is built (adapter init timed separately), a few warm-up
steps run, then timed steps. Printed: adapter init time, step time (mean and spread),
tokens/s, peak memory, and every method's step time against LoRA's from the same process.

    python benchmarks/bench_train_throughput.py                                  # 1 GPU, TP=1
    torchrun --nproc_per_node 8 benchmarks/bench_train_throughput.py --tp 8 --sp # one 8-GPU node
    python benchmarks/bench_train_throughput.py --small                          # CPU, minutes

Peak memory is torch's max_memory_allocated on GPU (reset per method) and the process's
peak RSS on CPU (a high-water mark over the whole process, so only the first method's
figure is its own). Baseline to beat (platform notes, HF + PEFT LoRA, one H100, bf16,
seq 2048): 10,054 tokens/s at 49.9 GiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from milora_megatron.adapters.variants import get_variant  # noqa: E402
from milora_megatron.models.decoder import DecoderShape  # noqa: E402
from milora_megatron.train.config import load_config  # noqa: E402
from milora_megatron.train.inputs import Data  # noqa: E402
from milora_megatron.train.loop import Trainer, setup  # noqa: E402
from milora_megatron.train.synthetic import RandomBase, random_tokens  # noqa: E402

LLAMA3_8B = dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256, max_seq=8192,
                 rope_theta=500000.0)
SMALL = dict(layers=4, hidden=512, heads=8, kv_heads=2, ffn=1408, vocab=8192, max_seq=2048, rope_theta=500000.0)


def random_data(n: int, seq_len: int, vocab: int, seed: int) -> Data:
    return Data(train=random_tokens(n, seq_len, vocab, seed), valid=None, forgetting=None)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_method(method: str, args, shape: DecoderShape, out_dir: str) -> dict:
    steps = args.warmup_steps + args.steps
    overrides = [
        f"peft.method={method}", f"peft.rank={args.rank}", f"peft.alpha={get_variant(method).paper_alpha_per_rank * args.rank}",
        f"peft.dropout={args.dropout}", f"peft.targets=[{','.join(args.targets)}]", f"peft.residual={args.residual}",
        f"train.iters={steps}", f"train.seq_len={args.seq_len}", f"train.global_batch={args.global_batch}",
        f"train.micro_batch={args.micro_batch}", "train.eval_every=0", "train.warmup=1", "train.lr=3e-4",
        f"train.recompute={getattr(args, 'recompute', 'none')}",
        f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", f"parallel.sp={str(args.sp).lower()}",
        "output.save_every=0", "output.tensorboard=false", f"output.dir={os.path.join(out_dir, method)}",
        "model.load=random-weights",
    ]
    cfg = load_config(None, overrides)
    device, groups = setup(cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    data = random_data(args.global_batch * steps, args.seq_len, shape.vocab, seed=0)
    sync()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, groups, device, base=RandomBase(shape), data=data)
    sync()
    init_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        trainer.train_step()
        sync()
        if i >= args.warmup_steps:
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in trainer.params)
    result = {
        "method": method, "recompute": getattr(args, "recompute", "none"), "init_s": init_s, "step_s": statistics.mean(times),
        "step_s_sd": statistics.stdev(times) if len(times) > 1 else 0.0,
        "tokens_per_s": args.global_batch * args.seq_len / statistics.mean(times),
        "peak_mem_gib": peak_memory_gib(), "trainable_params_per_rank": trainable,
        "dtype": str(trainer.dtype).replace("torch.", ""),
    }
    del trainer, data
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a small Llama shape (4 layers, hidden 512) and seq 256 for CPU")
    p.add_argument("--methods", default="lora,milora", help="comma-separated methods to time (lora first: the reference)")
    p.add_argument("--rank", type=int, default=32, help="adapter rank (paper: 32)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,up_proj,down_proj", help="adapted modules")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout (paper: 0.05)")
    p.add_argument("--residual", default="branch", choices=["branch", "merge"],
                   help="PiSSA/MiLoRA residual mode (the trainer's default is branch)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default 2048; 256 with --small)")
    p.add_argument("--global-batch", type=int, default=None, help="samples per step (default 16; 4 with --small)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per micro-batch")
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers (e.g. to fit memory)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size must be a multiple of tp x pp)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--sp", action="store_true", help="sequence parallelism (needs tp > 1)")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                   help="activation recompute (train.recompute)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (allocator, kernels)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    args.targets = args.targets.split(",")
    args.seq_len = args.seq_len or (256 if args.small else 2048)
    args.global_batch = args.global_batch or (4 if args.small else 16)
    dims = dict(SMALL if args.small else LLAMA3_8B)
    if args.layers:
        dims["layers"] = args.layers
    shape = DecoderShape(**dims)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    rank0 = int(os.environ.get("RANK", "0")) == 0
    results = []
    with tempfile.TemporaryDirectory() as out_dir:
        for method in args.methods.split(","):
            results.append(bench_method(method, args, shape, out_dir))
            if rank0:
                r = results[-1]
                print(f"{method}: init {r['init_s']:.1f} s, step {r['step_s']:.3f} s, {r['tokens_per_s']:.0f} tokens/s, "
                      f"peak {r['peak_mem_gib']:.1f} GiB", flush=True)
    if not rank0:
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"\n{device}, world {world}, TP={args.tp} PP={args.pp} SP={args.sp}; shape {dims}; seq {args.seq_len}, "
          f"global batch {args.global_batch}, micro-batch {args.micro_batch}, rank {args.rank}, "
          f"targets {','.join(args.targets)}, residual {args.residual}, dtype {results[0]['dtype']} "
          f"(adapter factors fp32), {args.steps} timed steps after {args.warmup_steps}\n")
    ref = next((r["step_s"] for r in results if r["method"] == "lora"), None)
    print("| method | adapter init (s) | step time (s) | tokens/s | peak memory (GiB) | step time / LoRA's |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['step_s'] / ref:.3f}" if ref else "-"
        print(f"| {r['method']} | {r['init_s']:.1f} | {r['step_s']:.3f} ± {r['step_s_sd']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_mem_gib']:.1f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "world": world, "args": vars(args), "shape": dims, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
