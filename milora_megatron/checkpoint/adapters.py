"""Adapter checkpoints of a training run: the trained factors (and the initial B0/A0 the
method subtracts), unsharded, under their Hugging Face module names.

A run folder holds ``checkpoints/step_NNNNNNN/`` and a ``checkpoints/latest`` pointer. Each
pipeline stage's first tensor-parallel rank writes ``adapter-stageSSS.safetensors``; only
r-wide factors are gathered over TP to do it. ``adapter.json`` records the method, the step
and the base checkpoint (path and fingerprint) the run trained on.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import PARTIAL_SUFFIX, atomic_directory, write_text_atomic

FORMAT = "milora-megatron-adapter"
VERSION = 1
META = "adapter.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
FACTORS = ("lora_A", "lora_B", "lora_A0", "lora_B0")


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f"step_{step:07d}")


def _local_factors(targets):
    """(name, this rank's tensor, TP split dim or None) for every factor of ``targets``."""
    for t in targets:
        for factor in FACTORS:
            local = getattr(t.adapter, factor, None)
            if local is not None:
                yield f"{t.name}.{factor}", local, t.factor_split_dim(factor)


def gather_factors(targets, tp_group=None) -> dict[str, torch.Tensor]:
    """Full float32 factors of this stage's targets on the CPU, keyed ``<hf module>.<factor>``
    (collective over TP: gathered on the model's device, then moved)."""
    import torch.distributed as dist

    tp = tp_group.size() if tp_group is not None else 1
    out = {}
    for key, local, dim in _local_factors(targets):
        local = local.detach().float().contiguous()
        if dim is not None and tp > 1:
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local, group=tp_group)
            local = torch.cat(parts, dim=dim)
        out[key] = local.cpu().clone()
    return out


@torch.no_grad()
def scatter_factors(targets, tensors: dict[str, torch.Tensor], tp_rank: int = 0, tp_size: int = 1) -> None:
    """Load full factors (from ``gather_factors``) into this rank's shards."""
    for key, local, dim in _local_factors(targets):
        if key not in tensors:
            raise KeyError(f"adapter checkpoint lacks {key}")
        full = tensors[key]
        if dim is not None:
            full = full.chunk(tp_size, dim=dim)[tp_rank]
        if tuple(full.shape) != tuple(local.shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(full.shape)} does not fit {tuple(local.shape)}")
        local.copy_(full.to(local.dtype))


def save_adapter_checkpoint(path: str, targets, peft_config, base, step: int, extra_writer=None) -> None:
    """Write one checkpoint folder of a (possibly distributed) run atomically; collective over all ranks.

    ``base`` is the ``BaseCheckpoint`` trained on; ``extra_writer(tmp_dir)``, if given, lets
    every rank add its own files (optimizer, RNG and data state) before the commit.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        write_adapter_checkpoint(path, gather_factors(targets), peft_config, base, step, extra_writer=extra_writer)
        return
    factors = gather_factors(targets, ps.get_tensor_model_parallel_group())
    write_adapter_checkpoint(
        path, factors, peft_config, base, step,
        stage=ps.get_pipeline_model_parallel_rank(), stages=ps.get_pipeline_model_parallel_world_size(),
        writes_factors=ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0,
        group=dist.group.WORLD, extra_writer=extra_writer,
    )


def write_adapter_checkpoint(path: str, factors: dict[str, torch.Tensor], peft_config, base, step: int,
                             stage: int = 0, stages: int = 1, writes_factors: bool = True, group=None,
                             extra_writer=None) -> None:
    """The checkpoint folder from full factors (this stage's), then ``latest`` pointed at it.
    With a ``group``, every member calls it; its first rank writes the metadata and the pointer."""
    import torch.distributed as dist

    lead = group is None or dist.get_rank(group) == 0
    with atomic_directory(path, overwrite=True, group=group) as tmp:
        if writes_factors:
            save_file(factors, os.path.join(tmp, f"adapter-stage{stage:03d}.safetensors"))
        if extra_writer is not None:
            extra_writer(tmp)
        if lead:
            meta = {
                "format": FORMAT, "version": VERSION, "step": step, "peft": asdict(peft_config),
                "base": {"path": base.path, "fingerprint": base.fingerprint},
                "stages": stages, "files": [f"adapter-stage{s:03d}.safetensors" for s in range(stages)],
            }
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
    if lead:
        run_checkpoints = os.path.dirname(os.path.abspath(path))
        write_text_atomic(os.path.join(run_checkpoints, LATEST), os.path.basename(path) + "\n")
    if group is not None:
        dist.barrier(group=group)


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint folder from itself or from a run folder (its latest checkpoint)."""
    path = os.path.abspath(path)
    if path.endswith(PARTIAL_SUFFIX):
        raise ValueError(f"{path} is an interrupted checkpoint (never completed)")
    if os.path.isfile(os.path.join(path, META)):
        return path
    ckpts = os.path.join(path, CHECKPOINTS)
    if not os.path.isdir(ckpts):
        raise FileNotFoundError(f"{path} is neither a base checkpoint, an adapter checkpoint nor a run folder")
    latest = os.path.join(ckpts, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            chosen = os.path.join(ckpts, f.read().strip())
        if not os.path.isfile(os.path.join(chosen, META)):
            raise ValueError(f"{latest} names {chosen}, which is missing or incomplete (interrupted checkpoint)")
        return chosen
    partial = glob.glob(os.path.join(ckpts, "*" + PARTIAL_SUFFIX))
    hint = f" (only interrupted ones: {[os.path.basename(p) for p in partial]})" if partial else ""
    raise FileNotFoundError(f"run folder {path} has no checkpoint{hint}")


class AdapterCheckpoint:
    def __init__(self, path: str):
        self.path = resolve_checkpoint_dir(path)
        with open(os.path.join(self.path, META)) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise ValueError(f"{self.path}/{META}: not a {FORMAT} v{VERSION} checkpoint")
        for name in self.meta["files"]:
            if not os.path.isfile(os.path.join(self.path, name)):
                raise FileNotFoundError(f"adapter checkpoint {self.path} lacks {name} (interrupted or damaged)")

    @property
    def peft(self) -> dict:
        return self.meta["peft"]

    @property
    def scaling(self) -> float:
        return float(self.peft["alpha"]) / self.peft["rank"]

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """All factors, or only those whose name starts with ``prefix`` (e.g. one layer's)."""
        out = {}
        for name in self.meta["files"]:
            with safe_open(os.path.join(self.path, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
        return out

    def open_base(self, verify: bool = False):
        """The base checkpoint this run trained on; an error if it is gone or was replaced."""
        from .base import BaseCheckpoint

        recorded = self.meta["base"]
        if not os.path.isdir(recorded["path"]):
            raise FileNotFoundError(f"the base checkpoint this run trained on, {recorded['path']}, is missing")
        base = BaseCheckpoint(recorded["path"])
        if base.fingerprint != recorded["fingerprint"]:
            raise ValueError(
                f"base checkpoint {base.path} changed since training (fingerprint {base.fingerprint[:12]} "
                f"!= recorded {recorded['fingerprint'][:12]}); export needs the exact base the adapter was trained on"
            )
        if verify:
            base.check_files(checksums=True)
        return base
