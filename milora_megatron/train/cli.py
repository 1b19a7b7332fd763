"""Fine-tune a converted checkpoint (Llama, Qwen2/2.5, Qwen3, Mistral) with MiLoRA / PiSSA / LoRA / MiCA on megatron-core.

    torchrun --nproc_per_node N launch/pretrain_milora.py --config configs/FILE.yaml [key=value ...]
    torchrun --nproc_per_node N -m milora_megatron.train --config configs/FILE.yaml [key=value ...]

Overrides use the config's dotted keys (e.g. train.lr=1e-4 parallel.tp=2 peft.targets=q_proj,v_proj).
Rerunning the same command resumes from the latest checkpoint in output.dir. SIGTERM/SIGUSR1
save a checkpoint and exit cleanly (what Slurm sends before a time limit or preemption).
"""

import argparse
import os
import signal
import sys


def _stop_with_the_launcher() -> None:
    """torchrun starts its workers in sessions of their own, so a killed launcher would leave
    them training (and a rerun would train beside them). Ask the kernel to send this worker
    SIGTERM when its parent dies (Linux): the trainer then saves a checkpoint and exits."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _say(text: str) -> None:
    """One line, from one rank (every rank meets the same error; the first one speaks)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pretrain_milora: {text}", file=sys.stderr, flush=True)


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
        _say(f"config error: {exc}")
        return 2
    if not cfg.model.load:
        _say("config error: model.load is not set (a checkpoint from tools/convert/hf_to_megatron.py)")
        return 2
    if "LOCAL_RANK" in os.environ:
        _stop_with_the_launcher()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from milora_megatron.train.loop import run
    from milora_megatron.train.run_folder import RunFolderError

    try:
        result = run(cfg)
    except (ValueError, KeyError, OSError, RunFolderError) as exc:  # what a user can fix: one line, no traceback
        _say(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}")
        return 2
    except SystemExit as exc:  # a stop the trainer decided (non-finite loss, diverged factors)
        if isinstance(exc.code, str):
            _say(exc.code)
            return 1
        raise
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"done: step {result['step']}, checkpoint {result['checkpoint']}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
