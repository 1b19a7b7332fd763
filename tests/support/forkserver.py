"""One fork server for the processes the suite starts in-session (gloo ranks, trainer ranks):
it imports torch, megatron-core and the trainer once, and each process forks from it instead
of importing them again (seconds per process, most of a small test's time).

A forked process is fresh all the same: nothing of the test process's state reaches it but
what is passed explicitly, the environment included (``adopt``). Libraries that read the
environment when imported (huggingface_hub, datasets, transformers) are left out of the
preload, so each process reads its own HF_HOME / HF_HUB_OFFLINE.
"""

from __future__ import annotations

import multiprocessing
import os

PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.parallel_state",
           "megatron.core.tensor_parallel", "megatron.core.models.gpt", "milora_megatron.compat",
           "milora_megatron.adapters.apply", "milora_megatron.models.decoder", "milora_megatron.models.layers",
           "milora_megatron.train.loop", "milora_megatron.train.cli"]
multiprocessing.set_forkserver_preload(PRELOAD)  # an import that fails there is done per process instead
CONTEXT = multiprocessing.get_context("forkserver")


def adopt(env: dict[str, str]) -> None:
    """Take the test's environment (as it was when the process was asked for)."""
    os.environ.clear()
    os.environ.update(env)
