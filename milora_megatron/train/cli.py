"""Fine-tune a converted checkpoint (Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 3, Qwen3-MoE, Mixtral) with MiLoRA / PiSSA / LoRA / MiCA on megatron-core.

    torchrun --nproc_per_node N launch/pretrain_milora.py --config configs/FILE.yaml [key=value ...]
    torchrun --nproc_per_node N -m milora_megatron.train --config configs/FILE.yaml [key=value ...]

Overrides use the config's dotted keys (e.g. train.lr=1e-4 parallel.tp=2 peft.targets=q_proj,v_proj).
Rerunning the same command resumes from the latest checkpoint in output.dir. SIGTERM/SIGUSR1
(what Slurm sends before a time limit or preemption) and Ctrl-C save a checkpoint and exit
cleanly; a second Ctrl-C aborts at once, keeping the last checkpoint. output.dir must be new,
empty, or a run folder: a run never writes into another folder (an HF model, a base checkpoint).
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
    from milora_megatron.errors import UserError
    from milora_megatron.train.config import describe, load_config

    p = argparse.ArgumentParser(description=__doc__, epilog="config keys (section.key = default):\n" + describe(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as exc:
        _say(f"config error: {exc}")
        return 2
    if not cfg.model.load:
        _say("config error: model.load is not set (a checkpoint from tools/convert/hf_to_megatron.py)")
        return 2
    if "LOCAL_RANK" in os.environ:
        _stop_with_the_launcher()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from milora_megatron.errors import UserError, as_user_error
    from milora_megatron.train.loop import run

    try:
        result = run(cfg)
    except Exception as exc:  # what a user can act on: one line, no traceback; a bug keeps its traceback
        error = as_user_error(exc)
        if not isinstance(error, UserError):
            raise
        _say(f"error: {error}" if error.exit_code == 2 else str(error))
        return error.exit_code
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"done: step {result['step']}, checkpoint {result['checkpoint']}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
