"""Run a function on N real gloo ranks (separate processes, forked from the suite's fork
server: forkserver.py) with megatron's parallel state set up."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp
from forkserver import adopt


def _worker(rank, world, init_file, out_dir, tp, pp, ep, etp, fn, kwargs, env):
    adopt(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist
        from megatron.core import parallel_state

        from milora_megatron import compat

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        compat.apply("cpu")  # the suite runs on the CPU (conftest hides GPUs)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        compat.model_parallel_manual_seed(1234)
        result = fn(**kwargs)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_distributed(fn, world: int, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, **kwargs) -> list:
    """fn(**kwargs) on ``world`` ranks; returns each rank's (picklable) result, by global rank.
    ``ep``/``etp``: megatron's expert-parallel and expert-tensor-parallel sizes (None: tp)."""
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        try:
            mp.start_processes(_worker, args=(world, init_file, out_dir, tp, pp, ep, etp, fn, kwargs,
                                              dict(os.environ)), nprocs=world, join=True, start_method="forkserver")
        except Exception as exc:
            errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
            raise RuntimeError("distributed worker failed:\n" + "\n".join(errors)) from exc
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
