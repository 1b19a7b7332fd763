"""A run's checkpoints in one place: what a save writes and keeps, what a resume loads, and
the run folder's records of them.

* A save writes the adapter factors, every rank's own state (AdamW, RNG, position) and the
  layout-free AdamW moments (unsharded, under HF names), atomically, refuses factors that
  diverged, and keeps the newest ``output.keep_last``.
* A resume at the saved layout loads every rank's own state: it continues bit-exactly. At
  another layout (``ResumePlan.relayout``) it loads the layout-free moments, re-sharded, and
  reseeds the dropout streams (RNG states do not map across layouts).
* ``config.json`` is the config the checkpoints now continue under; ``run.json`` the base, the
  layout, the dtype and the data (a Hub dataset's commit) they were saved with.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from ..adapters.apply import fold_initial
from ..checkpoint.adapters import (AdapterCheckpoint, diverged, local_factors, save_adapter_checkpoint, scatter_factors,
                                   step_dir)
from ..checkpoint.atomic import write_json_atomic
from ..device import all_reduce_scalars
from ..errors import RunFolderError
from .parallel import seed_per_replica
from .run_folder import ResumePlan
from .state import (gather_moments, install_moments, load_moments, load_state, prune, set_rng_state, state_writer,
                    write_moments)


class Checkpointer:
    def __init__(self, out: str, cfg, groups, targets, optimizer, loss_scale, base, device):
        self.out, self.cfg, self.groups = out, cfg, groups
        self.targets, self.optimizer, self.loss_scale = targets, optimizer, loss_scale
        self.base, self.device = base, device
        self.rank = dist.get_rank()

    # ---- save --------------------------------------------------------------------------
    def save(self, step: int, position: int) -> str:
        """The checkpoint of ``step``, unless a factor has diverged on any rank (then
        FloatingPointError: a checkpoint on the way to a divergence is not a good one)."""
        bad = diverged({key: local for key, local, _ in local_factors(self.targets)})
        if all_reduce_scalars([1.0 if bad else 0.0], op=dist.ReduceOp.MAX)[0] > 0:
            raise FloatingPointError(f"adapter factors diverged at step {step} "
                                     f"({'; '.join(bad[:3]) if bad else 'on another rank'}): not saved")
        path = step_dir(self.out, step)
        g = self.groups
        # layout-independent too: the r-wide AdamW moments, unsharded under HF names (collective
        # over TP; an expert's over its expert-TP group, each EP rank writing its own experts')
        dense = [t for t in self.targets if not t.is_expert]
        experts = [t for t in self.targets if t.is_expert]
        moments, adam_step = gather_moments(dense, self.optimizer, g.tp)
        expert_moments, expert_step = gather_moments(experts, self.optimizer) if experts else ({}, 0)
        layout_free = {"step": step, "position": position, "adam_step": max(adam_step, expert_step),
                       "loss_scale": self.loss_scale.state_dict()}
        per_rank = state_writer(self.rank, self.optimizer, step, position, self.device,
                                extra={"loss_scale": self.loss_scale.state_dict()})

        def writer(folder: str) -> list[str]:
            names = per_rank(folder)
            if g.tp_rank == 0 and g.dp_rank == 0:  # one writer per pipeline stage
                names.append(write_moments(folder, g.pp_rank, moments, layout_free))
            if experts and g.etp_rank == 0 and g.expert_dp_rank == 0:  # and per expert-parallel rank
                names.append(write_moments(folder, g.pp_rank, expert_moments, layout_free, ep_rank=g.ep_rank))
            return names

        save_adapter_checkpoint(path, self.targets, self.cfg.peft, self.base, step, extra_writer=writer,
                                run_config=self.cfg.to_dict())
        if self.rank == 0:
            prune(self.out, self.cfg.output.keep_last)
        dist.barrier()
        return path

    # ---- resume ------------------------------------------------------------------------
    def resume(self, plan: ResumePlan) -> tuple[int, int]:
        """Load the checkpoint the plan chose into the factors, the optimizer, the RNG and the
        loss scale; returns its (step, position in the sample order)."""
        g = self.groups
        latest = AdapterCheckpoint(plan.resume)  # verified on rank 0 by the plan
        if not self.base.is_the_base_of(latest.meta["base"]["fingerprint"]):
            raise RunFolderError(f"{self.out} was trained on another base checkpoint ({latest.meta['base']['path']})")
        scatter_factors(self.targets, latest.tensors(), g.tp_rank, g.tp_size)
        fold_initial(self.targets, self.cfg.peft)  # merge mode: W - s B0 A0, from the loaded B0, A0
        if plan.relayout:
            moments, state = load_moments(latest, plan.saved_stages)
            install_moments(self.targets, self.optimizer, moments, state["adam_step"], g.tp_rank, g.tp_size)
            seed_per_replica(self.cfg.train.seed + state["step"], g)
        else:
            state = load_state(latest, self.rank)
            self.optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"], self.device)
        self.loss_scale.load_state_dict(state.get("loss_scale", self.loss_scale.state_dict()))
        return state["step"], state["position"]

    # ---- the run folder's records ------------------------------------------------------
    def record(self, total_steps: int, dtype, data_sources: dict) -> None:
        """config.json and run.json: what the checkpoints from now on are saved under."""
        if self.rank != 0:
            return
        g = self.groups
        write_json_atomic(os.path.join(self.out, "config.json"), self.cfg.to_dict())
        write_json_atomic(os.path.join(self.out, "run.json"), {
            "base": {"path": self.base.path, "fingerprint": self.base.fingerprint},
            "world_size": dist.get_world_size(), "tp": g.tp_size, "pp": g.pp_size, "dp": g.dp_size,
            **({"ep": g.ep_size, "etp": g.etp_size} if self.base.shape.experts else {}),
            "total_steps": total_steps, "device": self.device.type, "dtype": str(dtype).replace("torch.", ""),
            **({"data": data_sources} if data_sources else {}),
        })
