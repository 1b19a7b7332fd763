"""Adapter checkpoints of a training run: the trained factors (and the initial B0/A0 the
method subtracts), unsharded, under their Hugging Face module names.

A run folder holds ``checkpoints/step_NNNNNNN/`` and a ``checkpoints/latest`` pointer (a
hint: readers take the newest complete checkpoint). Each pipeline stage's first
tensor-parallel rank writes ``adapter-stageSSS.safetensors``; only r-wide factors are
gathered over TP to do it. ``adapter.json`` records the method, the step, the base
checkpoint (path and fingerprint) the run trained on, and the size and sha256 of every
file in the folder.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import asdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, DiskFullError, MissingPathError, UserError, as_user_error
from .atomic import PARTIAL_SUFFIX, REPLACED_SUFFIX, atomic_directory, sha256_file, write_text_atomic
from .base import verify_recorded_files

FORMAT = "milora-megatron-adapter"
VERSION = 2  # 2: adapter.json records every file's size and sha256
META = "adapter.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
FACTORS = ("lora_A", "lora_B", "lora_A0", "lora_B0")


# The bound on a saved factor entry, past which the run that wrote it diverged (or the file
# is damaged). Every factor is checked, each against a scale that does not come from itself:
# * the initial A0, B0 (PiSSA, MiLoRA: sqrt(sigma / s) times unit singular vectors of a base
#   weight, so at most sqrt(sigma_max / s), tens for real models) against FACTOR_LIMIT itself;
# * a trained A, B against FACTOR_LIMIT times max(1, max|A0|) (resp. |B0|) when that initial
#   factor passed its own check, else FACTOR_LIMIT: the weights they adapt are O(1), and
#   AdamW moves an entry by ~lr per step. LoRA and MiCA (no A0/B0) start below 1.
FACTOR_LIMIT = 1e4
INITIAL_FACTORS = ("lora_A0", "lora_B0")
TRAINED_FACTORS = ("lora_A", "lora_B")


def _out_of_bounds(key: str, t: torch.Tensor, limit: float) -> str | None:
    """Why ``t`` is not a sane factor (not finite, or an entry beyond ``limit``), or None."""
    t = t.detach()
    if not t.numel():
        return None
    if not bool(torch.isfinite(t).all()):
        return f"{key} is not finite"
    peak = float(t.abs().max())
    return f"{key} reached {peak:.3g} (limit {limit:.3g})" if peak > limit else None


def diverged(factors: dict[str, torch.Tensor]) -> list[str]:
    """The factors (``<module>.lora_A``, ``.lora_B``, ``.lora_A0``, ``.lora_B0`` keys: every
    saved tensor) that are not finite or out of bounds (see FACTOR_LIMIT), in ``factors``'
    order. An initial factor that fails its check does not widen its trained factor's limit."""
    scale = {}
    for key, t in factors.items():
        if key.endswith(INITIAL_FACTORS) and t.numel() and _out_of_bounds(key, t, FACTOR_LIMIT) is None:
            scale[key] = max(1.0, float(t.detach().abs().max()))
    bad = []
    for key, t in factors.items():
        if key.endswith(INITIAL_FACTORS):
            limit = FACTOR_LIMIT
        elif key.endswith(TRAINED_FACTORS):
            limit = FACTOR_LIMIT * scale.get(key + "0", 1.0)
        else:
            continue
        problem = _out_of_bounds(key, t, limit)
        if problem:
            bad.append(problem)
    return bad


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f"step_{step:07d}")


def local_factors(targets):
    """(name, this rank's tensor, TP split dim or None) for every factor of ``targets``."""
    for t in targets:
        for factor in FACTORS:
            local = getattr(t.adapter, factor, None)
            if local is not None:
                yield f"{t.name}.{factor}", local, t.factor_split_dim(factor)


def shard_group(target, tp_group):
    """The group a target's factors are split over: an MoE expert's own expert-TP group
    (megatron's, on its linear), else the model's TP group."""
    return target.module.tp_group if getattr(target, "is_expert", False) else tp_group


def shard_position(target, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """This rank's (rank, size) in the group a target's factors are split over."""
    group = shard_group(target, None)
    return (group.rank(), group.size()) if group is not None else (tp_rank, tp_size)


def gather_factors(targets, tp_group=None) -> dict[str, torch.Tensor]:
    """Full float32 factors of this stage's targets on the CPU, keyed ``<hf module>.<factor>``
    (collective over TP, an expert's over its expert-TP group: gathered on the model's
    device, then moved)."""
    import torch.distributed as dist

    out = {}
    for t in targets:
        group = shard_group(t, tp_group)
        tp = group.size() if group is not None else 1
        for key, local, dim in local_factors([t]):
            local = local.detach().float().contiguous()
            if dim is not None and tp > 1:
                parts = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(parts, local, group=group)
                local = torch.cat(parts, dim=dim)
            out[key] = local.cpu().clone()
    return out


@torch.no_grad()
def scatter_factors(targets, tensors: dict[str, torch.Tensor], tp_rank: int = 0, tp_size: int = 1) -> None:
    """Load full factors (from ``gather_factors``) into this rank's shards (an expert's: its
    expert-TP rank's)."""
    for t in targets:
        _scatter_target(t, tensors, *shard_position(t, tp_rank, tp_size))


def _scatter_target(target, tensors, tp_rank: int, tp_size: int) -> None:
    for key, local, dim in local_factors([target]):
        if key not in tensors:
            raise CheckpointError(f"adapter checkpoint lacks {key}")
        full = tensors[key]
        if dim is not None:
            full = full.chunk(tp_size, dim=dim)[tp_rank]
        if tuple(full.shape) != tuple(local.shape):
            raise CheckpointError(f"{key}: checkpoint shape {tuple(full.shape)} does not fit {tuple(local.shape)}")
        local.copy_(full.to(local.dtype))


def expert_file(stage: int, ep_rank: int) -> str:
    """The file of one expert-parallel rank's expert factors (a stage's dense ones are in
    ``adapter-stageSSS.safetensors``)."""
    return f"adapter-stage{stage:03d}-experts{ep_rank:03d}.safetensors"


def save_adapter_checkpoint(path: str, targets, peft_config, base, step: int, extra_writer=None,
                            run_config: dict | None = None) -> None:
    """Write one checkpoint folder of a (possibly distributed) run atomically; collective over all ranks.

    ``base`` is the ``BaseCheckpoint`` trained on; ``extra_writer(tmp_dir)``, if given, lets
    every rank add its own files (optimizer, RNG and data state) before the commit and
    returns their names. ``run_config``: the training run's whole config, recorded so that a
    resume can check what it may not change against the checkpoint itself.

    An MoE model's expert factors never travel beyond their expert-TP group: each
    expert-parallel rank writes its own experts (``expert_file``), so no rank holds every
    expert's factors at once.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        write_adapter_checkpoint(path, gather_factors(targets), peft_config, base, step, extra_writer=extra_writer,
                                 run_config=run_config)
        return
    dense = [t for t in targets if not getattr(t, "is_expert", False)]
    experts = [t for t in targets if getattr(t, "is_expert", False)]
    stage = ps.get_pipeline_model_parallel_rank()
    factors = gather_factors(dense, ps.get_tensor_model_parallel_group())
    more = {}
    if experts:
        expert_factors = gather_factors(experts)
        if ps.get_expert_tensor_parallel_rank() == 0 and ps.get_expert_data_parallel_rank() == 0:
            more[expert_file(stage, ps.get_expert_model_parallel_rank())] = expert_factors
    write_adapter_checkpoint(
        path, factors, peft_config, base, step,
        stage=stage, stages=ps.get_pipeline_model_parallel_world_size(),
        writes_factors=ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0,
        group=dist.group.WORLD, extra_writer=extra_writer, run_config=run_config, more_factors=more,
    )


def _file_record(folder: str, name: str) -> dict:
    full = os.path.join(folder, name)
    return {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}


def write_adapter_checkpoint(path: str, factors: dict[str, torch.Tensor], peft_config, base, step: int,
                             stage: int = 0, stages: int = 1, writes_factors: bool = True, group=None,
                             extra_writer=None, run_config: dict | None = None,
                             more_factors: dict | None = None) -> None:
    """The checkpoint folder from full factors (this stage's), then ``latest`` pointed at it.
    With a ``group``, every member calls it; its first rank writes the metadata and the pointer.
    ``more_factors``: more factor files this rank writes (file name -> tensors: an expert-
    parallel rank's experts); ``adapter.json`` lists every rank's.

    Every rank checksums the files it wrote (in parallel); the first rank records them all
    in ``adapter.json``, which is written last: a folder with a readable ``adapter.json``
    whose files match their checksums is a complete checkpoint.
    """
    import torch.distributed as dist

    lead = group is None or dist.get_rank(group) == 0
    with atomic_directory(path, overwrite=True, group=group) as tmp:
        written, failure = [], None
        try:  # a rank that fails to write (a full disk) must not leave the others waiting
            if writes_factors:
                name = f"adapter-stage{stage:03d}.safetensors"
                save_file(factors, os.path.join(tmp, name))
                written.append(name)
            for name, tensors in (more_factors or {}).items():
                save_file(tensors, os.path.join(tmp, name))
                written.append(name)
            if extra_writer is not None:
                written += extra_writer(tmp) or []
            mine = {name: _file_record(tmp, name) for name in written}
        except Exception as exc:
            if group is None:
                raise
            failure, mine = as_user_error(exc, path), {}
        if group is not None:
            everyone = [None] * dist.get_world_size(group)
            dist.all_gather_object(everyone, (mine, None if failure is None else
                                              (isinstance(failure, DiskFullError), str(failure))), group=group)
            failures = [f for _, f in everyone if f is not None]
            if failure is not None and not isinstance(failure, UserError):
                raise failure
            if failures:
                raise DiskFullError(path) if any(full for full, _ in failures) else RuntimeError(
                    f"another rank failed to write {path}: {failures[0][1]}")
            mine = {k: v for records, _ in everyone for k, v in records.items()}
        if lead:
            meta = {
                "format": FORMAT, "version": VERSION, "step": step, "peft": asdict(peft_config),
                "base": {"path": base.path, "fingerprint": base.fingerprint},
                "stages": stages, "files": [f"adapter-stage{s:03d}.safetensors" for s in range(stages)]
                + sorted(n for n in mine if n.startswith("adapter-stage") and "-experts" in n),
                "checksums": dict(sorted(mine.items())),
            }
            if run_config is not None:
                meta["run_config"] = run_config
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
    if lead:
        run_checkpoints = os.path.dirname(os.path.abspath(path))
        write_text_atomic(os.path.join(run_checkpoints, LATEST), os.path.basename(path) + "\n")
    if group is not None:
        dist.barrier(group=group)


def _step_of(folder: str) -> int:
    return int(os.path.basename(folder).split(".")[0][len("step_"):])


def candidates(run_dir: str) -> list[str]:
    """A run's checkpoint folders, newest step first. ``step_N.replaced`` (the previous
    copy of a step, kept while a re-save renames its successor into place) comes right
    after ``step_N``; interrupted ``.partial`` folders are never candidates."""
    found = [p for p in glob.glob(os.path.join(run_dir, CHECKPOINTS, "step_*"))
             if os.path.isdir(p) and (p.endswith(REPLACED_SUFFIX) or "." not in os.path.basename(p))]
    return sorted(found, key=lambda p: (-_step_of(p), p.endswith(REPLACED_SUFFIX)))


def newest_complete(run_dir: str, verify: bool = True, required=()) -> tuple["AdapterCheckpoint | None", list[str]]:
    """The newest checkpoint of a run that is complete (and, with ``verify``, matches its
    checksums), and why each newer one was passed over. ``required``: more file names a
    checkpoint must hold (e.g. every rank's training state). The ``latest`` pointer is only
    a hint: a deleted pointer or a damaged newest checkpoint does not hide the older ones."""
    skipped = []
    for folder in candidates(run_dir):
        try:
            ckpt = AdapterCheckpoint(folder, verify=verify)
            missing = [name for name in required if not os.path.isfile(os.path.join(ckpt.path, name))]
            if missing:
                raise MissingPathError(f"lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
            return ckpt, skipped
        except (UserError, OSError) as exc:
            skipped.append(f"{os.path.basename(folder)}: {exc}")
    return None, skipped


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint folder from itself or from a run folder (its newest complete checkpoint)."""
    path = os.path.abspath(path)
    if path.endswith(PARTIAL_SUFFIX):
        raise CheckpointError(f"{path} is an interrupted checkpoint (never completed)")
    if os.path.isfile(os.path.join(path, META)):
        return path
    if os.path.basename(path).startswith("step_"):
        raise MissingPathError(f"{path} has no {META} (interrupted or damaged)")
    ckpts = os.path.join(path, CHECKPOINTS)
    if not os.path.isdir(ckpts):
        raise MissingPathError(f"{path} is neither a base checkpoint, an adapter checkpoint nor a run folder")
    chosen, skipped = newest_complete(path, verify=False)
    if chosen is None:
        partial = glob.glob(os.path.join(ckpts, "*" + PARTIAL_SUFFIX))
        hint = f" (only interrupted ones: {[os.path.basename(p) for p in partial]})" if partial else ""
        damaged = f"; passed over: {'; '.join(skipped)}" if skipped else ""
        raise MissingPathError(f"run folder {path} has no complete checkpoint{hint}{damaged}")
    if skipped:
        print(f"warning: using {chosen.path}; newer checkpoints are incomplete: {'; '.join(skipped)}", file=sys.stderr)
    return chosen.path


class AdapterCheckpoint:
    """A complete adapter checkpoint: every listed file present with its recorded size (and,
    with ``verify``, checksum). Version-1 folders (before checksums) are read unverified."""

    def __init__(self, path: str, verify: bool = False):
        self.path = resolve_checkpoint_dir(path)
        try:
            with open(os.path.join(self.path, META)) as f:
                self.meta = json.load(f)
        except ValueError as exc:
            raise CheckpointError(f"{self.path}/{META} is not valid JSON ({exc})") from exc
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT or self.meta.get("version") not in (1, VERSION):
            raise CheckpointError(f"{self.path}/{META}: not a {FORMAT} v1/v{VERSION} checkpoint")
        lacking = [k for k in ("step", "peft", "base", "files") if k not in self.meta]
        if lacking:
            raise CheckpointError(f"{self.path}/{META} lacks {', '.join(lacking)} (damaged)")
        for name in self.meta["files"]:
            if not os.path.isfile(os.path.join(self.path, name)):
                raise MissingPathError(f"adapter checkpoint {self.path} lacks {name} (interrupted or damaged)")
        verify_recorded_files(self.path, self.meta.get("checksums", {}), verify, "adapter checkpoint")
        self.verified = verify and "checksums" in self.meta

    @property
    def step(self) -> int:
        return self.meta["step"]

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

    def open_base(self, verify: bool = False, path: str | None = None):
        """The base checkpoint this run trained on (at its recorded path, or ``path`` when it
        was moved); an error if it is gone or is not the same base."""
        from .base import BaseCheckpoint

        recorded = self.meta["base"]
        where = path or recorded["path"]
        if not os.path.isdir(where):
            raise MissingPathError(f"the base checkpoint this run trained on, {where}, is missing"
                                    + ("" if path else " (if it was moved, give its new place with --base)"))
        base = BaseCheckpoint(where)
        if not base.is_the_base_of(recorded["fingerprint"]):
            raise CheckpointError(
                f"base checkpoint {base.path} changed since training (fingerprint {base.fingerprint[:12]} "
                f"!= recorded {recorded['fingerprint'][:12]}); export needs the exact base the adapter was trained on"
            )
        if verify:
            base.check_files(checksums=True)
        return base
