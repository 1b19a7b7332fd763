#!/usr/bin/env python
"""Fine-tune a converted Llama checkpoint with MiLoRA / PiSSA / LoRA / MiCA on megatron-core.

    torchrun --nproc_per_node N launch/pretrain_milora.py --config configs/FILE.yaml [key=value ...]

Overrides use the config's dotted keys (e.g. train.lr=1e-4 parallel.tp=2 peft.targets=q_proj,v_proj).
Rerunning the same command resumes from the latest checkpoint in output.dir. SIGTERM/SIGUSR1
save a checkpoint and exit cleanly (what Slurm sends before a time limit or preemption).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

KEY_HELP = """
config keys (section.key = default):
{keys}

  model.load        converted base checkpoint (tools/convert/hf_to_megatron.py)
  model.spec        local (torch-native SDPA + RMSNorm); te is refused (TE linears cannot be adapted)
  model.device      auto (this rank's GPU when CUDA is visible, else CPU) | cuda | cpu
  model.dtype       auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 (dynamic loss scale) | fp32;
                    the adapter factors, their gradients and AdamW state are fp32 in every case
  train.recompute   none | selective (core attention) | full (every layer): activation memory for compute
  data.train/valid  jsonl, json, parquet file or a datasets save_to_disk folder
  data.template     alpaca (instruction/[input]/output) | metamath (query/response); loss on the response only
  data.forgetting   held-out general text (.txt or a 'text' column): forgetting loss vs the base model
  data.pack         pack examples into train.seq_len sequences instead of truncating/padding each
  train.iters       optimizer steps (-1: from train.epochs; 0: initialise adapters, save, stop)
  train.global_batch / micro_batch   sequences per step over all data-parallel ranks / per forward
  train.warmup, train.schedule       linear warmup steps, then linear | cosine decay to train.min_lr
  train.clip_grad   global gradient-norm clip (0: off); train.eval_every: validation/forgetting period
  parallel.tp/pp/sp tensor / pipeline parallel sizes, sequence parallelism
  peft.method       lora | pissa | milora | mica;  peft.alpha empty/null: alpha = rank
  peft.residual     branch (W untouched, exact) | merge (W - s B0 A0 written into W, as in PEFT)
  output.dir        run folder: config.json, run.json, metrics.jsonl, checkpoints/step_N, checkpoints/latest
  output.save_every checkpoint period in steps (0: only at the end); output.keep_last: how many to keep
"""


def main(argv=None) -> int:
    from milora_megatron.train.config import ConfigError, describe, load_config

    p = argparse.ArgumentParser(description=__doc__, epilog=KEY_HELP.format(keys=describe()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"pretrain_milora: config error: {exc}", file=sys.stderr)
        return 2
    if not cfg.model.load:
        print("pretrain_milora: config error: model.load is not set (a checkpoint from tools/convert/hf_to_megatron.py)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from milora_megatron.train.loop import run

    result = run(cfg)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"done: step {result['step']}, checkpoint {result['checkpoint']}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
