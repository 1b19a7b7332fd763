"""The fine-tuning run: base checkpoint -> megatron model (+ adapters) -> megatron's pipeline
schedule -> adapter checkpoints and metrics in ``output.dir``.

The ``Trainer`` orchestrates; the pieces live beside it: ``run_folder`` (lock and resume
plan), ``inputs`` (the data), ``parallel`` (process groups), ``pipeline`` (the forward step and
megatron's schedule), ``gradients`` (data-parallel sum, loss scale, norm and clipping),
``evaluation`` (validation and forgetting losses), ``checkpointer`` (save, resume, the run
folder's records), ``signals`` (stop requests) and ``verification`` (the base's checksums).

Only adapter factors train, as float32 masters. The optimizer is torch's AdamW over them:
megatron-core's optimizers (and its distributed optimizer) are CUDA-only, and sharding the
optimizer state of r-wide factors (a few MB per layer) over data-parallel ranks would save
nothing worth the coupling; gradients are summed over data-parallel ranks once per step.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import torch
import torch.distributed as dist

from ..adapters.apply import AdaptedTarget, apply_adapters
from ..checkpoint.base import BaseCheckpoint
from ..device import all_reduce_scalars, resolve_device, resolve_dtype
from ..errors import ConfigError, DiskFullError, TrainingStopped
from ..models.decoder import build_gpt, transformer_config
from .batches import SampleOrder, micro_batches, sample_parts, scored_labels
from .checkpointer import Checkpointer
from .config import RunConfig
from .evaluation import eval_micro_batches, forgetting_loss, validation_loss
from .gradients import LossScale, clip_, global_grad_norm, reduce_over_data_parallel, unscale_
from .inputs import Data, check_same_data, load_data
from .metrics import MetricsLog
from .parallel import ParallelGroups, init_distributed, seed_per_replica
from .pipeline import last_stage_totals, masked_loss_step, run_schedule
from .run_folder import RunFolder, prepare
from .schedule import lr_at
from .signals import StopSignals
from .sinks import TensorBoardSink, WandbSink
from .verification import BaseVerification


class Trainer:
    """``base`` and ``data`` default to what the config names (``model.load``, ``data.*``); the
    throughput benchmark and the GPU check pass random weights and tokens instead."""

    def __init__(self, cfg: RunConfig, groups: ParallelGroups, device: torch.device, base=None,
                 data: Data | None = None, stop: StopSignals | None = None, folder: RunFolder | None = None):
        self.cfg, self.groups, self.device = cfg, groups, device
        self.rank = dist.get_rank()
        g, t = groups, cfg.train
        if t.global_batch % (g.dp_size * t.micro_batch):
            raise ConfigError(f"train.global_batch {t.global_batch} is not a multiple of data-parallel size {g.dp_size} "
                             f"x train.micro_batch {t.micro_batch}")
        self.num_micro = t.global_batch // (g.dp_size * t.micro_batch)
        self.dtype = resolve_dtype(cfg.model.dtype, device)
        self.out = os.path.abspath(cfg.output.dir)
        self.stop = stop
        self.base = base if base is not None else BaseCheckpoint(cfg.model.load)
        shape = self.base.shape
        shape.check_seq_len(t.seq_len)
        shape.check_parallel(g.tp_size, g.pp_size, g.ep_size, cfg.parallel.etp)
        if cfg.peft.moe_targets != "all" and not shape.experts:
            raise ConfigError(f"peft.moe_targets={cfg.peft.moe_targets!r} is for mixture-of-experts models and this "
                              f"{shape.family} model is dense: leave it at 'all'")
        if shape.experts and g.tp_size > 1 and not cfg.parallel.sp:
            raise ConfigError(f"a mixture-of-experts model at parallel.tp={g.tp_size} trains with sequence parallelism "
                              "only (megatron's MoE layer refuses otherwise): set parallel.sp=true")
        # cheap checks first: the run folder (lock, resume plan) and the data, then the model
        self.folder = folder if folder is not None else prepare(cfg, dist.get_world_size(), g.host)
        self.plan = self.folder.plan
        self.data = data if data is not None else load_data(cfg, self.base, g.host)
        if self.plan.resume is not None:
            check_same_data(self.plan.data, self.data.sources)
        # beside the model build and init
        verifying = BaseVerification(self.base, self.rank, dist.get_world_size(), g.host)
        start = time.perf_counter()
        mcfg = transformer_config(shape, tp=g.tp_size, pp=g.pp_size, sp=cfg.parallel.sp, dtype=self.dtype,
                                  device=device, recompute=t.recompute, perform_initialization=False,
                                  ep=g.ep_size, etp=cfg.parallel.etp)
        self.model = build_gpt(shape, mcfg).to(device)
        self.base.load_into(self.model, g.tp_rank, g.tp_size)
        self.peft = cfg.peft
        # a resume loads A, B, A0, B0 from its checkpoint: no eigensolve at all
        self.init_stats = {"source": "checkpoint" if self.plan.resume is not None else "init"}
        # the init cache needs weights with an identity; random stand-in weights have none
        fingerprint = self.base.fingerprint if isinstance(self.base, BaseCheckpoint) else None
        if self.peft.init_cache and fingerprint is None and self.rank == 0:
            print("peft.init_cache is not used: the base weights are random stand-ins", flush=True)
        self.targets: list[AdaptedTarget] = apply_adapters(
            self.model, self.peft, g.tp, g.dp, progress=self.rank == 0, seed=t.seed,
            from_checkpoint=self.plan.resume is not None, stats=self.init_stats, base_fingerprint=fingerprint)
        if self.init_stats.get("cache_hits") and not self.init_stats.get("cache_misses"):
            self.init_stats["source"] = "cache"
        self.init_s = time.perf_counter() - start
        verifying.result()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.moe = bool(shape.experts)  # expert factors: their own groups for gradients and norms
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay,
                                           fused=device.type == "cuda")
        self.loss_scale = LossScale(dynamic=self.dtype == torch.float16)
        self.checkpoints = Checkpointer(self.out, cfg, g, self.targets, self.optimizer, self.loss_scale, self.base,
                                        device)
        seed_per_replica(t.seed, g)
        self.order = SampleOrder(len(self.data.train[0]), t.seed)
        n = len(self.data.train[0])
        self.total = t.iters if t.iters >= 0 else math.ceil(t.epochs * n / t.global_batch)
        self.step, self.position = 0, 0
        self.saved_step, self.saved_path = None, None
        self.metrics = MetricsLog(self.out, self.total, enabled=self.rank == 0,
                                  sinks=self._sinks() if self.rank == 0 else ())

    def _sinks(self) -> list:
        o, sinks = self.cfg.output, []
        if o.tensorboard:
            sinks.append(TensorBoardSink(self.out))
        if o.wandb_project:
            sinks.append(WandbSink(self.out, o.wandb_project, self.cfg.to_dict()))
        return sinks

    # ---- bookkeeping -------------------------------------------------------------------
    def resume_or_start(self) -> None:
        """Load the checkpoint the run-folder plan chose, or record a fresh start."""
        notes = self.plan.notes
        per_rank = [None] * dist.get_world_size()
        s = self.init_stats
        dist.all_gather_object(per_rank, (s["eigensolves"], s["source"], s.get("cache_hits"), s.get("cache_misses")))
        event = {"event": "init", "init_s": round(self.init_s, 3), "eigensolves_per_rank": [r[0] for r in per_rank]}
        sources = {r[1] for r in per_rank}  # a stage may read the cache while another fills it
        event["factors_from"] = sources.pop() if len(sources) == 1 else "cache+init"
        if self.peft.init_cache and per_rank[0][2] is not None:
            event["cache_hits_per_rank"] = [r[2] for r in per_rank]  # targets of the rank's stage
            event["cache_misses_per_rank"] = [r[3] for r in per_rank]
            event["init_cache"] = os.path.abspath(self.peft.init_cache)
        self.metrics.log(event, console=False)
        if self.plan.resume is not None:
            self.step, self.position = self.checkpoints.resume(self.plan)
        # the run's record follows what a resume changed (lr, iters, ...): config and total steps
        self.checkpoints.record(self.total, self.dtype, self.data.sources)
        if self.plan.resume is not None:
            changed = self.plan.changed
            self.metrics.log({"event": "resumed", "from": self.plan.resume, "step": self.step,
                              "total_steps": self.total, **({"changed": changed} if changed else {}),
                              **({"notes": notes} if notes else {})})
        elif notes:
            self.metrics.log({"event": "started", "notes": notes})

    def save(self) -> str:
        """A checkpoint of the current step (Checkpointer.save). A Ctrl-C during the save waits
        for it; a stop right after a periodic save returns that save."""
        if self.saved_step == self.step and self.saved_path:
            return self.saved_path
        with self.stop.saving_checkpoint() if self.stop is not None else contextlib.nullcontext():
            path = self.checkpoints.save(self.step, self.position)
        self.saved_step, self.saved_path = self.step, path
        return path

    def _heartbeat(self) -> None:
        lock = self.folder.lock
        if lock is not None and time.time() - lock.record["heartbeat"] > 30:
            lock.heartbeat()

    # ---- one step ----------------------------------------------------------------------
    def train_step(self) -> dict:
        t, g = self.cfg.train, self.groups
        start = time.time()
        indices = self.order.step_indices(self.position, t.global_batch, g.dp_rank, g.dp_size)
        tokens, masks, positions = sample_parts(self.data.train)
        # the step's micro-batches go to the device once, before the schedule (pinned, not
        # blocking); the global batch's scored tokens are counted on the host, no collective
        batches = [b.to(self.device) for b in micro_batches(tokens, masks, indices, t.micro_batch, positions)]
        tokens = scored_labels(masks, self.order.global_indices(self.position, t.global_batch))
        self.model.train()
        for p in self.params:
            p.grad = None
        scale = self.loss_scale.scale
        step = masked_loss_step(tokens, len(batches), loss_scale=scale)
        results = run_schedule(self.model, batches, step, t.seq_len, t.micro_batch, forward_only=False)
        loss_t = last_stage_totals(results, ["loss_sum"], g)
        reduce_over_data_parallel(self.params, g.dp, g.dp_size, g.expert_dp, g.expert_dp_size)
        unscale_(self.params, scale)
        norm_t = global_grad_norm(self.params, g.mp, g.expert_mp if self.moe else None, g.etp_rank)
        # the step's one host sync: the loss and the gradient norm together
        loss, norm = torch.stack([loss_t[0], norm_t.to(loss_t.device, torch.float64)]).tolist()
        lr = lr_at(self.step, self.total, t.lr, t.warmup, t.schedule, t.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at step {self.step + 1}")
        record = {}
        if self.loss_scale.update(math.isfinite(norm)):
            clip_(self.params, t.clip_grad, norm_t)
            self.optimizer.step()
        elif self.loss_scale.dynamic:  # fp16 overflow: skip this step, the scale was lowered
            record["skipped"] = True
        else:
            raise FloatingPointError(f"non-finite grad norm {norm} at step {self.step + 1}")
        if self.loss_scale.dynamic:
            record["loss_scale"] = scale
        self.step += 1
        self.position += t.global_batch
        elapsed = time.time() - start
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "loss_tokens": tokens,
                "step_time_s": round(elapsed, 4), "tokens_per_s": t.global_batch * t.seq_len / elapsed,
                "epoch": round(self.position / len(self.data.train[0]), 4), **record}

    # ---- evaluation --------------------------------------------------------------------
    def evaluate(self) -> None:
        t, g = self.cfg.train, self.groups
        record = {"step": self.step, "event": "eval"}
        if self.data.valid is not None:
            tokens, masks, positions = sample_parts(self.data.valid)
            batches = eval_micro_batches(tokens, masks, t.eval_batches * t.micro_batch, t.micro_batch, g, positions)
            record["valid_loss"] = validation_loss(self.model, batches, g, t.seq_len, t.micro_batch)
        if self.data.forgetting is not None:
            tokens, masks = self.data.forgetting
            batches = eval_micro_batches(tokens, masks, len(tokens), t.micro_batch, g)
            record["forgetting_loss"] = forgetting_loss(self.model, batches, g, t.seq_len, t.micro_batch)
        if len(record) > 2:
            self.metrics.log(record)

    # ---- the run -----------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """A stop signal on any rank, or a full disk under rank 0's metrics (then all ranks
        raise the same DiskFullError instead of training on without a record)."""
        signalled = self.stop is not None and self.stop.received is not None
        full = self.metrics.disk_full
        agreed = all_reduce_scalars([float(signalled), float(full is not None)], op=dist.ReduceOp.MAX)
        if agreed[1] > 0:
            raise DiskFullError(full or os.path.join(self.out, "metrics.jsonl"))
        return agreed[0] > 0

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.metrics.close()
            self.folder.release()

    def _run(self) -> dict:
        self.resume_or_start()
        t, o = self.cfg.train, self.cfg.output
        if self.total == 0:
            path = self.save()
            self.metrics.log({"event": "saved initial adapters (train.iters=0)", "checkpoint": path})
            return {"step": 0, "checkpoint": path}
        if self.step == 0 and self.rank == 0:
            g = self.groups
            experts = f" EP={g.ep_size} expert-TP={g.etp_size}" if self.moe else ""
            print(f"training {self.peft.method} r={self.peft.rank} for {self.total} steps on {self.device.type} "
                  f"in {str(self.dtype).replace('torch.', '')} (TP={g.tp_size} PP={g.pp_size} DP={g.dp_size}{experts}, "
                  f"{self.num_micro} micro-batches of {t.micro_batch} per step; model and adapters ready in "
                  f"{self.init_s:.1f} s)", flush=True)
        last = {}
        try:
            while self.step < self.total:
                last = self.train_step()
                if self.step % t.log_every == 0 or self.step == self.total:
                    self.metrics.log(last)
                    self._heartbeat()
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total:
                    self.evaluate()
                if o.save_every and self.step % o.save_every == 0 and self.step < self.total:
                    self.save()
                if self._stop_requested():
                    path = self.save()
                    self.metrics.log({"event": "stopped", "reason": f"received {self.stop.received or 'a stop signal'}",
                                      "step": self.step, "checkpoint": path})
                    # one line on stderr, whatever the launcher prints after it (plain torchrun
                    # answers SIGTERM/SIGINT with a traceback of its own and exit 1)
                    self.stop._say(f"saved {path} (step {self.step}) after a stop signal "
                                   f"({self.stop.received or 'from another rank'}): the save succeeded; "
                                   "rerun the same command to resume")
                    return {"step": self.step, "checkpoint": path, "stopped": True}
            self.evaluate()
            path = self.save()
        except FloatingPointError as exc:
            self.metrics.log({"event": "stopped", "reason": str(exc), "step": self.step})
            raise TrainingStopped(f"stopping: {exc}; the last good checkpoint is kept in {self.out}") from None
        self.metrics.log({"event": "done", "step": self.step, "checkpoint": path})
        return {"step": self.step, "checkpoint": path, "loss": last.get("loss")}


def setup(cfg: RunConfig) -> tuple[torch.device, ParallelGroups]:
    """This process's device and the run's process groups, from the config."""
    device = resolve_device(cfg.model.device)
    p = cfg.parallel
    return device, init_distributed(device, p.tp, p.pp, cfg.train.seed, p.timeout_minutes, ep=p.ep, etp=p.etp)


def run(cfg: RunConfig) -> dict:
    stop = StopSignals()  # first: a stop request during the (long) init still saves
    device, groups = setup(cfg)
    folder = prepare(cfg, dist.get_world_size(), groups.host)  # the run folder's lock and plan, before any expensive work
    try:
        return Trainer(cfg, groups, device, stop=stop, folder=folder).run()
    finally:
        folder.release()
