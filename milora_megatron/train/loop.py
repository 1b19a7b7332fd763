"""The fine-tuning run: base checkpoint -> megatron model (+ adapters) -> megatron's pipeline
schedule -> adapter checkpoints and metrics in ``output.dir``.

The ``Trainer`` orchestrates; the pieces live beside it: ``parallel`` (process groups),
``pipeline`` (the forward step and megatron's schedule), ``gradients`` (data-parallel sum,
loss scale, norm and clipping), ``evaluation`` (validation and forgetting losses),
``state`` (resume state) and ``data``.

Only adapter factors train, as float32 masters. The optimizer is torch's AdamW over them:
megatron-core's optimizers (and its distributed optimizer) are CUDA-only, and sharding the
optimizer state of r-wide factors (a few MB per layer) over data-parallel ranks would save
nothing worth the coupling; gradients are summed over data-parallel ranks once per step.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..adapters.apply import AdaptedTarget, apply_adapters, fold_initial
from ..checkpoint.adapters import (AdapterCheckpoint, diverged, local_factors, save_adapter_checkpoint, scatter_factors,
                                   step_dir)
from ..checkpoint.atomic import write_json_atomic
from ..checkpoint.base import BaseCheckpoint
from ..errors import CheckpointError, ConfigError, DiskFullError, RunFolderError, TrainingStopped
from ..device import all_reduce_scalars, resolve_device, resolve_dtype
from ..models.decoder import build_gpt, transformer_config
from .batches import SampleOrder, micro_batches, sample_parts, scored_labels
from .config import RunConfig
from .inputs import Data, check_same_data, load_data
from .evaluation import eval_micro_batches, forgetting_loss, validation_loss
from .gradients import LossScale, clip_, global_grad_norm, reduce_over_data_parallel, unscale_
from .metrics import MetricsLog
from .sinks import TensorBoardSink, WandbSink
from .parallel import ParallelGroups, init_distributed, seed_per_replica
from .run_folder import prepare
from .pipeline import last_stage_totals, masked_loss_step, run_schedule
from .schedule import lr_at
from .state import (gather_moments, install_moments, load_moments, load_state, prune, set_rng_state, state_writer,
                    write_moments)


class BaseVerification:
    """Each rank verifies the checksums of its share of the base checkpoint's files in a
    thread (sha256 releases the GIL) while the model is built and the adapters initialised;
    ``result()`` gathers the verdicts and raises on every rank if any file changed."""

    def __init__(self, base, rank: int, world: int, host_group=None):
        import threading

        self.group = host_group
        self.verdict = None
        self.thread = None
        if hasattr(base, "check_share"):  # not for the benchmarks' random base
            self.thread = threading.Thread(target=lambda: setattr(self, "verdict", base.check_share(rank, world)),
                                           daemon=True)
            self.thread.start()

    def result(self) -> None:
        if self.thread is None:
            return
        self.thread.join()
        verdicts = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, self.verdict, group=self.group)
        bad = [v for v in verdicts if v]
        if bad:
            raise CheckpointError(f"{bad[0]}: the base checkpoint is damaged; convert it again")


class StopSignals:
    """SIGTERM / SIGUSR1 (Slurm's time limit, preemption) and Ctrl-C (SIGINT) recorded, to be
    acted on between steps: the run saves a checkpoint and stops. Installed before the model
    is built, so a signal during a long init still saves.

    A second Ctrl-C aborts at once without saving (the last checkpoint is kept), except
    while a checkpoint is being written: that save completes first, then the run aborts."""

    def __init__(self):
        self.received: str | None = None
        self.saving = False
        self.abort_after_save = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.received == "SIGINT":
            if self.saving:
                self.abort_after_save = True
                self._say("Ctrl-C again: a checkpoint is being written; aborting as soon as it is complete")
                return
            self._abort()
        if self.received is None:
            self.received = name
            if signum == signal.SIGINT:
                self._say("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again aborts at "
                          "once, keeping the last checkpoint)")

    @staticmethod
    def _say(text: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pretrain_milora: {text}", file=sys.stderr, flush=True)

    def _abort(self):
        self._say("Ctrl-C again: aborted without saving; rerunning the same command resumes from the last "
                  "checkpoint")
        os._exit(130)

    @contextlib.contextmanager
    def saving_checkpoint(self):
        """A Ctrl-C that arrives during the block waits for it to finish."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
            if self.abort_after_save:
                self._abort()


class Trainer:
    """``base`` and ``data`` default to what the config names (``model.load``, ``data.*``); the
    throughput benchmark and the GPU check pass random weights and tokens instead."""

    def __init__(self, cfg: RunConfig, groups: ParallelGroups, device: torch.device, base=None,
                 data: Data | None = None, stop: StopSignals | None = None, folder: tuple | None = None):
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
        self.plan, self.lock = folder if folder is not None else prepare(cfg, dist.get_world_size(), g.host)
        self.data = data if data is not None else load_data(cfg, self.base, g.host)
        if self.plan["resume"] is not None:
            check_same_data(self.plan.get("data"), self.data.sources)
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
        self.init_stats = {"source": "checkpoint" if self.plan["resume"] is not None else "init"}
        # the init cache needs weights with an identity; random stand-in weights have none
        fingerprint = self.base.fingerprint if isinstance(self.base, BaseCheckpoint) else None
        if self.peft.init_cache and fingerprint is None and self.rank == 0:
            print("peft.init_cache is not used: the base weights are random stand-ins", flush=True)
        self.targets: list[AdaptedTarget] = apply_adapters(
            self.model, self.peft, g.tp, g.dp, progress=self.rank == 0, seed=t.seed,
            from_checkpoint=self.plan["resume"] is not None, stats=self.init_stats, base_fingerprint=fingerprint)
        if self.init_stats.get("cache_hits") and not self.init_stats.get("cache_misses"):
            self.init_stats["source"] = "cache"
        self.init_s = time.perf_counter() - start
        verifying.result()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.moe = bool(shape.experts)  # expert factors: their own groups for gradients and norms
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay,
                                           fused=device.type == "cuda")
        self.loss_scale = LossScale(dynamic=self.dtype == torch.float16)
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
        g = self.groups
        notes = self.plan["notes"]
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
        if self.plan["resume"] is not None:
            latest = AdapterCheckpoint(self.plan["resume"])  # verified on rank 0 by the plan
            if not self.base.is_the_base_of(latest.meta["base"]["fingerprint"]):
                raise RunFolderError(f"{self.out} was trained on another base checkpoint ({latest.meta['base']['path']})")
            scatter_factors(self.targets, latest.tensors(), g.tp_rank, g.tp_size)
            fold_initial(self.targets, self.peft)  # merge mode: W - s B0 A0, from the loaded B0, A0
            if self.plan.get("relayout"):
                moments, state = load_moments(latest, self.plan["saved_stages"])
                install_moments(self.targets, self.optimizer, moments, state["adam_step"], g.tp_rank, g.tp_size)
                seed_per_replica(self.cfg.train.seed + state["step"], g)  # RNG states do not map across layouts
                self._record_layout()
            else:
                state = load_state(latest, self.rank)
                self.optimizer.load_state_dict(state["optimizer"])
                set_rng_state(state["rng"], self.device)
            self.step, self.position = state["step"], state["position"]
            self.loss_scale.load_state_dict(state.get("loss_scale", self.loss_scale.state_dict()))
            changed = self.plan.get("changed") or []
            # the run's record follows what this resume changed (lr, iters, ...): config and total steps
            if self.rank == 0:
                write_json_atomic(os.path.join(self.out, "config.json"), self.cfg.to_dict())
            if not self.plan.get("relayout"):
                self._record_layout()
            self.metrics.log({"event": "resumed", "from": latest.path, "step": self.step, "total_steps": self.total,
                              **({"changed": changed} if changed else {}), **({"notes": notes} if notes else {})})
            return
        if self.rank == 0:
            write_json_atomic(os.path.join(self.out, "config.json"), self.cfg.to_dict())
        self._record_layout()
        if notes:
            self.metrics.log({"event": "started", "notes": notes})

    def _record_layout(self) -> None:
        """run.json: the base and the layout the checkpoints from now on are saved at."""
        if self.rank == 0:
            g = self.groups
            write_json_atomic(os.path.join(self.out, "run.json"), {
                "base": {"path": self.base.path, "fingerprint": self.base.fingerprint},
                "world_size": dist.get_world_size(), "tp": g.tp_size, "pp": g.pp_size, "dp": g.dp_size,
                **({"ep": g.ep_size, "etp": g.etp_size} if self.moe else {}),
                "total_steps": self.total, "device": self.device.type, "dtype": str(self.dtype).replace("torch.", ""),
                **({"data": self.data.sources} if self.data.sources else {}),
            })

    def _diverged(self) -> list[str]:
        """This rank's factors that are not finite or have exploded (see checkpoint.adapters.diverged)."""
        return diverged({key: local for key, local, _ in local_factors(self.targets)})

    def save(self) -> str:
        """A checkpoint of the current step, unless a factor has diverged anywhere (then
        FloatingPointError: a checkpoint on the way to a divergence is not a good one).
        A Ctrl-C during the save waits for it."""
        if self.saved_step == self.step and self.saved_path:
            return self.saved_path  # a stop right after a periodic save: that checkpoint is this step's
        with self.stop.saving_checkpoint() if self.stop is not None else contextlib.nullcontext():
            path = self._save()
        self.saved_step, self.saved_path = self.step, path
        return path

    def _save(self) -> str:
        bad = self._diverged()
        if all_reduce_scalars([1.0 if bad else 0.0], op=dist.ReduceOp.MAX)[0] > 0:
            raise FloatingPointError(f"adapter factors diverged at step {self.step} "
                                     f"({'; '.join(bad[:3]) if bad else 'on another rank'}): not saved")
        path = step_dir(self.out, self.step)
        g = self.groups
        # layout-independent too: the r-wide AdamW moments, unsharded under HF names (collective
        # over TP; an expert's over its expert-TP group, each EP rank writing its own experts')
        dense = [t for t in self.targets if not t.is_expert]
        experts = [t for t in self.targets if t.is_expert]
        moments, adam_step = gather_moments(dense, self.optimizer, g.tp)
        expert_moments, expert_step = gather_moments(experts, self.optimizer) if experts else ({}, 0)
        adam_step = max(adam_step, expert_step)
        layout_free = {"step": self.step, "position": self.position, "adam_step": adam_step,
                       "loss_scale": self.loss_scale.state_dict()}
        per_rank = state_writer(self.rank, self.optimizer, self.step, self.position, self.device,
                                extra={"loss_scale": self.loss_scale.state_dict()})

        def writer(folder: str) -> list[str]:
            names = per_rank(folder)
            if g.tp_rank == 0 and g.dp_rank == 0:  # one writer per pipeline stage
                names.append(write_moments(folder, g.pp_rank, moments, layout_free))
            if experts and g.etp_rank == 0 and g.expert_dp_rank == 0:  # and per expert-parallel rank
                names.append(write_moments(folder, g.pp_rank, expert_moments, layout_free, ep_rank=g.ep_rank))
            return names

        save_adapter_checkpoint(path, self.targets, self.peft, self.base, self.step, extra_writer=writer,
                                run_config=self.cfg.to_dict())
        if self.rank == 0:
            prune(self.out, self.cfg.output.keep_last)
        dist.barrier()
        return path

    def _heartbeat(self) -> None:
        if self.lock is not None and time.time() - self.lock.record["heartbeat"] > 30:
            self.lock.heartbeat()

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
            if self.lock is not None:
                self.lock.release()

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
        if folder[1] is not None:
            folder[1].release()
