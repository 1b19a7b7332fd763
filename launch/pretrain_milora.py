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

def main(argv=None) -> int:
    from milora_megatron.train.config import ConfigError, describe, load_config

    p = argparse.ArgumentParser(description=__doc__, epilog="config keys (section.key = default):\n" + describe(),
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
