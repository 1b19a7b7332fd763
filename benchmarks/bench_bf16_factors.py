"""What bf16 training does to the adapter updates, with and without fp32 master factors.

The real trainer at TP=2 on a small Llama-shaped model (random weights, random tokens),
MiLoRA, a small learning rate with the paper's linear decay, run three ways:

  fp32          model and factors in fp32: the reference
  bf16          model in bf16, factors fp32 masters (what the trainer does)
  bf16-factors  model in bf16, factors, gradients and AdamW state cast to bf16 after the
                init (the trainer's behaviour before fp32 masters; emulated here by casting
                the trained factors and rebuilding the optimizer over them)

For each: the adapter update after N steps (each trained factor minus its value at step 0)
against the fp32 run's, as ||U - U_fp32|| / ||U_fp32|| over all factors; and how often a
step changed nothing: the fraction of (step, factor) pairs where no entry moved, and the
mean fraction of entries a step left unchanged.

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_bf16_factors.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from milora_megatron.models.decoder import DecoderShape  # noqa: E402
from milora_megatron.train.config import load_config  # noqa: E402
from milora_megatron.train.inputs import Data  # noqa: E402
from milora_megatron.train.loop import Trainer, setup  # noqa: E402
from milora_megatron.train.synthetic import RandomBase, random_tokens  # noqa: E402

MODES = ("fp32", "bf16", "bf16-factors")


def run_mode(mode: str, args, shape: DecoderShape, out_dir: str) -> tuple[dict, dict]:
    import torch.distributed as dist
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    overrides = [
        f"model.dtype={'fp32' if mode == 'fp32' else 'bf16'}", "model.device=cpu", f"parallel.tp={args.tp}",
        f"peft.method={args.method}", f"peft.rank={args.rank}", "peft.dropout=0", f"train.iters={args.steps}",
        f"train.lr={args.lr}", "train.warmup=0", "train.schedule=linear", f"train.seq_len={args.seq_len}",
        f"train.global_batch={args.global_batch}", "train.micro_batch=1", "train.eval_every=0",
        f"output.dir={os.path.join(out_dir, mode)}", "model.load=random-weights",
    ]
    cfg = load_config(None, overrides)
    device, groups = setup(cfg)
    data = Data(random_tokens(args.global_batch * args.steps, args.seq_len, shape.vocab, seed=1), None, None)
    trainer = Trainer(cfg, groups, device, base=RandomBase(shape, seed=0), data=data)
    if mode == "bf16-factors":
        for p in trainer.params:
            p.data = p.data.to(torch.bfloat16)
        trainer.optimizer = torch.optim.AdamW(trainer.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    counted = [param_is_not_tensor_parallel_duplicate(p) for _, p in named]
    start = {n: p.detach().clone() for n, p in named}
    idle_pairs, unchanged, losses = 0, [], []
    for _ in range(args.steps):
        before = [p.detach().clone() for _, p in named]
        losses.append(trainer.train_step()["loss"])
        same = [torch.eq(p.detach(), b) for (_, p), b in zip(named, before)]
        idle_pairs += sum(int(s.all()) for s in same)
        unchanged.append(sum(int(s.sum()) for s in same) / sum(s.numel() for s in same))
    updates = {n: (p.detach().float() - start[n].float()) for n, p in named}
    world = dist.get_world_size()
    stats = torch.tensor([idle_pairs, len(named) * args.steps, sum(unchanged) / len(unchanged) / world], dtype=torch.float64)
    dist.all_reduce(stats)
    result = {
        "mode": mode, "factor_dtype": str(named[0][1].dtype).replace("torch.", ""),
        "optimizer_state_dtype": str(next(iter(trainer.optimizer.state.values()))["exp_avg"].dtype).replace("torch.", ""),
        "idle_step_fraction": stats[0].item() / stats[1].item(), "unchanged_entry_fraction": stats[2].item(),
        "loss_first": losses[0], "loss_last": losses[-1],
    }
    return result, {"updates": updates, "counted": dict(zip([n for n, _ in named], counted))}


def relative_difference(updates: dict, reference: dict) -> float:
    import torch.distributed as dist

    num = den = 0.0
    for name, ref in reference["updates"].items():
        if reference["counted"][name]:
            num += (updates["updates"][name] - ref).double().pow(2).sum().item()
            den += ref.double().pow(2).sum().item()
    t = torch.tensor([num, den], dtype=torch.float64)
    dist.all_reduce(t)
    return (t[0] / t[1]).sqrt().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per mode")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (linear decay to 0, no warmup)")
    p.add_argument("--method", default="milora", help="adapter method")
    p.add_argument("--rank", type=int, default=8, help="adapter rank")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (the world size)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sample")
    p.add_argument("--global-batch", type=int, default=4, help="samples per step")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the model (4 heads per 64)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, fp32 first ({', '.join(MODES)})")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if modes[0] != "fp32":
        p.error("the first mode must be fp32 (the reference)")
    h = args.hidden
    shape = DecoderShape(layers=2, hidden=h, heads=h // 64 * 4, kv_heads=h // 64 * 2, ffn=2 * h, vocab=1024, max_seq=512)
    import tempfile

    results, reference = [], None
    with tempfile.TemporaryDirectory() as out_dir:
        for mode in modes:
            result, updates = run_mode(mode, args, shape, out_dir)
            if reference is None:
                reference = updates
            result["update_rel_diff_vs_fp32"] = relative_difference(updates, reference)
            results.append(result)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"\n{args.method} r={args.rank}, TP={args.tp}, {args.steps} steps, lr {args.lr} linear to 0, "
              f"shape {shape.layers}x{h}, seq {args.seq_len}, batch {args.global_batch}\n")
        print("| mode | factors / AdamW state | update vs fp32 (rel.) | (step, factor) pairs with no change | "
              "entries unchanged per step | loss first -> last |")
        print("|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['mode']} | {r['factor_dtype']} / {r['optimizer_state_dtype']} | {r['update_rel_diff_vs_fp32']:.3g} | "
                  f"{r['idle_step_fraction']:.1%} | {r['unchanged_entry_fraction']:.1%} | "
                  f"{r['loss_first']:.4f} -> {r['loss_last']:.4f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=2)
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
