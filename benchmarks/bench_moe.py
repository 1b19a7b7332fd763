"""Mixture-of-experts costs at Qwen3-30B-A3B's shape: one sparse layer of 128 experts
(hidden 2048 -> expert FFN 768, top-8).

1. Initialisation of every expert adapter (gate, up, down of each expert: 384 matrices of
   768 x 2048, each its own minor subspace): all of them in one ``extract_subspaces`` call
   (same-shaped matrices batched through every phase) against one call per matrix, and the
   largest difference between the two (they must agree).
2. A training step through the real ``Trainer`` (random weights, random tokens): the sparse
   layer against a dense layer of the same active parameters (FFN 8 x 768 = 6144), MiLoRA on
   the paper's targets (q, k, v, up, down; every expert's up and down in the sparse layer).

    python benchmarks/bench_moe.py                     # CPU: minutes
    python benchmarks/bench_moe.py --experts 32        # a quarter of the experts
    python benchmarks/bench_moe.py --skip-step         # the initialisation only

A benchmark: it prints what it measured, it asserts no time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from milora_megatron.subspace import ShardedWeight, extract_subspaces  # noqa: E402

QWEN3_30B_A3B = dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, moe_ffn=768, experts=128, topk=8)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def expert_weights(experts: int, hidden: int, ffn: int, device: str) -> list[ShardedWeight]:
    """Every expert's gate, up (ColumnParallel: ffn x hidden) and down (RowParallel: hidden x
    ffn), bf16 as the Hub stores them, N(0, 0.02)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for e in range(experts):
        for name, shape, shard_dim in (("gate_proj", (ffn, hidden), 0), ("up_proj", (ffn, hidden), 0),
                                       ("down_proj", (hidden, ffn), 1)):
            w = (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16).to(device)
            out.append(ShardedWeight(f"experts.{e}.{name}", w, shard_dim))
    return out


def time_init(weights: list[ShardedWeight], rank: int, device: str) -> dict:
    extract_subspaces(weights[:2], rank, "minor")  # warm-up: first LAPACK / cuSOLVER calls, allocator
    extract_subspaces(weights[:1], rank, "minor")
    sync(device)
    t0 = time.perf_counter()
    batched = extract_subspaces(weights, rank, "minor")
    sync(device)
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [extract_subspaces([w], rank, "minor")[0] for w in weights]
    sync(device)
    single_s = time.perf_counter() - t0
    diff = max(float((a.sigma - b.sigma).abs().max() / b.sigma.max()) for a, b in zip(batched, single))
    return {"matrices": len(weights), "batched_s": batched_s, "one_by_one_s": single_s, "sigma_rel_diff": diff}


def time_step(sparse: bool, args, s: dict = QWEN3_30B_A3B) -> dict:
    """Seconds per training step of one decoder layer (sparse or its dense equivalent) of
    the shape ``s`` (``args``: experts, rank, seq_len, global_batch, steps, warmup_steps)."""
    import torch.distributed as dist

    from milora_megatron.models.decoder import DecoderShape
    from milora_megatron.train.config import load_config
    from milora_megatron.train.inputs import Data
    from milora_megatron.train.loop import Trainer, setup
    from milora_megatron.train.synthetic import RandomBase, random_tokens

    experts = args.experts
    dims = dict(layers=1, hidden=s["hidden"], heads=s["heads"], kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                vocab=8192, max_seq=4096, rope_theta=1e6, family="qwen3_moe" if sparse else "qwen3", qk_norm=True)
    if sparse:
        dims.update(ffn=s["moe_ffn"], experts=experts, experts_topk=s["topk"], moe_ffn=s["moe_ffn"])
    else:
        dims.update(ffn=s["topk"] * s["moe_ffn"])  # the same active MLP parameters per token
    shape = DecoderShape(**dims)
    steps = args.warmup_steps + args.steps
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [
            "peft.method=milora", f"peft.rank={args.rank}", "peft.dropout=0.05",
            "peft.targets=[q_proj,k_proj,v_proj,up_proj,down_proj]", f"train.iters={steps}",
            f"train.seq_len={args.seq_len}", f"train.global_batch={args.global_batch}", "train.micro_batch=1",
            "train.eval_every=0", "train.warmup=1", "output.save_every=0", "output.tensorboard=false",
            f"output.dir={out}/run", "model.load=random-weights"])
        device, groups = setup(cfg)
        data = Data(train=random_tokens(args.global_batch * steps, args.seq_len, shape.vocab, 0), valid=None,
                    forgetting=None)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, groups, device, base=RandomBase(shape), data=data)
        init_s = time.perf_counter() - t0
        times = []
        for i in range(steps):
            sync(device.type)
            t0 = time.perf_counter()
            trainer.train_step()
            sync(device.type)
            if i >= args.warmup_steps:
                times.append(time.perf_counter() - t0)
        trainable = sum(p.numel() for p in trainer.params)
        del trainer
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    return {"layer": f"sparse ({experts} experts, top-{s['topk']})" if sparse else f"dense (FFN {dims['ffn']})",
            "init_s": init_s, "step_s": statistics.mean(times), "step_sd": statistics.stdev(times) if len(times) > 1 else 0.0,
            "trainable": trainable}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=QWEN3_30B_A3B["experts"], help="experts of the sparse layer (128)")
    p.add_argument("--rank", type=int, default=32, help="adapter rank (paper: 32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the initialisation")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample of the training step")
    p.add_argument("--global-batch", type=int, default=4, help="samples per training step")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    p.add_argument("--skip-init", action="store_true", help="no initialisation timing")
    p.add_argument("--skip-step", action="store_true", help="no training-step timing")
    args = p.parse_args()
    s = QWEN3_30B_A3B
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads, rank {args.rank}")
    if not args.skip_init:
        weights = expert_weights(args.experts, s["hidden"], s["moe_ffn"], args.device)
        r = time_init(weights, args.rank, args.device)
        print(f"\n## Expert adapters' init, one sparse layer ({args.experts} experts x gate/up/down)")
        print("| matrices | batched (one call) s | one by one s | speed-up | max rel. sigma diff |\n|---|---|---|---|---|")
        print(f"| {r['matrices']} | {r['batched_s']:.2f} | {r['one_by_one_s']:.2f} | "
              f"{r['one_by_one_s'] / r['batched_s']:.2f}x | {r['sigma_rel_diff']:.1e} |", flush=True)
    if not args.skip_step:
        rows = [time_step(sparse, args) for sparse in (False, True)]
        print(f"\n## Training step, one decoder layer, seq {args.seq_len} x batch {args.global_batch}, MiLoRA r={args.rank}")
        print("| layer | step s (sd) | init s | trainable params |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['step_s']:.3f} ({r['step_sd']:.3f}) | {r['init_s']:.1f} | {r['trainable']:,} |")
        print(f"sparse / dense step time: {rows[1]['step_s'] / rows[0]['step_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
