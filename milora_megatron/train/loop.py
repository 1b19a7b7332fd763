"""The fine-tuning run: base checkpoint -> megatron model (+ adapters) -> megatron's pipeline
schedule -> adapter checkpoints and metrics in ``output.dir``.

Only adapter factors train. The optimizer is torch's AdamW over them: megatron-core's
optimizers (and its distributed optimizer) are CUDA-only, and sharding the optimizer state
of r-wide factors (a few MB per layer) over data-parallel ranks would save nothing worth
the coupling; gradients are summed over data-parallel ranks once per step instead.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import compat
from ..adapters import AdaptedTarget, apply_adapters, adapters_disabled
from ..checkpoint.adapters import AdapterCheckpoint, save_adapter_checkpoint, scatter_factors, step_dir
from ..checkpoint.base import BaseCheckpoint
from ..checkpoint.atomic import write_json_atomic
from ..models.llama import build_gpt, gather_logits, transformer_config
from . import data as D
from .config import RunConfig
from .metrics import MetricsLog
from .schedule import lr_at
from .state import load_state, prune, set_rng_state, state_writer


class StopRequested(Exception):
    pass


def init_distributed(cfg: RunConfig):
    """torch.distributed from torchrun's environment (or a single process), megatron's groups."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    world = dist.get_world_size()
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of parallel.tp x parallel.pp = {tp * pp}")
    compat.apply()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    compat.model_parallel_manual_seed(cfg.train.seed)


@dataclass
class Data:
    train: tuple[torch.Tensor, torch.Tensor]
    valid: tuple[torch.Tensor, torch.Tensor] | None
    forgetting: tuple[torch.Tensor, torch.Tensor] | None


def load_data(cfg: RunConfig, base: BaseCheckpoint) -> Data:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base.hf_side_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t, d = cfg.train, cfg.data

    def samples(path):
        tokens, masks = D.to_samples(D.tokenize_examples(path, d.template, tok), t.seq_len, pad, d.pack)
        keep = masks[:, 1:].sum(1) > 0
        if not keep.any():
            raise ValueError(f"{path}: no example keeps a response token within train.seq_len={t.seq_len} "
                             "(the prompts are longer); raise train.seq_len")
        if not keep.all() and dist.get_rank() == 0:
            print(f"warning: {path}: {int((~keep).sum())} of {len(keep)} examples have no response token within "
                  f"train.seq_len={t.seq_len} and are skipped", flush=True)
        return tokens[keep], masks[keep]

    if not d.train:
        raise ValueError("data.train is not set")
    forgetting = D.text_samples(d.forgetting, tok, t.seq_len, max_samples=t.eval_batches * t.micro_batch) if d.forgetting else None
    return Data(samples(d.train), samples(d.valid) if d.valid else None, forgetting)


class Trainer:
    """``base`` and ``data`` default to what the config names (``model.load``, ``data.*``); the
    throughput benchmark passes random weights and tokens instead, to time the same steps."""

    def __init__(self, cfg: RunConfig, base: BaseCheckpoint | None = None, data: Data | None = None):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.ps = ps
        self.rank = dist.get_rank()
        self.tp, self.tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        t = cfg.train
        if t.global_batch % (self.dp * t.micro_batch):
            raise ValueError(f"train.global_batch {t.global_batch} is not a multiple of data-parallel size {self.dp} "
                             f"x train.micro_batch {t.micro_batch}")
        self.num_micro = t.global_batch // (self.dp * t.micro_batch)
        self.dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.out = os.path.abspath(cfg.output.dir)
        self.base = base if base is not None else BaseCheckpoint(cfg.model.load)
        shape = self.base.shape
        if t.seq_len > shape.max_seq:
            raise ValueError(f"train.seq_len {t.seq_len} exceeds the model's max_position_embeddings {shape.max_seq}")
        mcfg = transformer_config(shape, tp=self.tp, pp=ps.get_pipeline_model_parallel_world_size(),
                                  sp=cfg.parallel.sp, dtype=self.dtype)
        self.model = build_gpt(shape, mcfg, spec=cfg.model.spec)
        if torch.cuda.is_available():
            self.model.cuda()
        self.base.load_into(self.model, self.tp_rank, self.tp)
        self.peft = cfg.peft_config()
        verbose = self.rank == 0
        self.targets: list[AdaptedTarget] = apply_adapters(self.model, self.peft, ps.get_tensor_model_parallel_group(),
                                                           ps.get_data_parallel_group(), progress=verbose)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # factors every TP rank holds whole (column A, row B): counted once in the grad norm
        replicated = {id(getattr(t.adapter, f)) for t in self.targets for f in ("lora_A", "lora_B")
                      if t.factor_split_dim(f) is None}
        self.norm_params = [p for p in self.params if id(p) not in replicated or self.tp_rank == 0]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.data = data if data is not None else load_data(cfg, self.base)
        self.order = D.SampleOrder(len(self.data.train[0]), t.seed)
        n = len(self.data.train[0])
        self.total = t.iters if t.iters >= 0 else math.ceil(t.epochs * n / t.global_batch)
        self.step, self.position = 0, 0
        self.metrics = MetricsLog(self.out, self.total, enabled=self.rank == 0)
        self._stop_signal = None

    # ---- bookkeeping -------------------------------------------------------------------
    def resume_or_start(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        latest = None
        try:
            latest = AdapterCheckpoint(self.out)
        except FileNotFoundError:
            pass
        if latest is not None:
            if latest.meta["base"]["fingerprint"] != self.base.fingerprint:
                raise ValueError(f"{self.out} was trained on another base checkpoint ({latest.meta['base']['path']})")
            scatter_factors(self.targets, latest.tensors(), self.tp_rank, self.tp)
            state = load_state(latest, self.rank)
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.position = state["step"], state["position"]
            set_rng_state(state["rng"])
            self.metrics.log({"event": "resumed", "from": latest.path, "step": self.step})
        elif self.rank == 0:
            write_json_atomic(os.path.join(self.out, "config.json"), self.cfg.to_dict())
            write_json_atomic(os.path.join(self.out, "run.json"), {
                "base": {"path": self.base.path, "fingerprint": self.base.fingerprint},
                "world_size": dist.get_world_size(), "tp": self.tp, "pp": self.ps.get_pipeline_model_parallel_world_size(),
                "dp": self.dp, "total_steps": self.total,
            })

    def save(self) -> str:
        path = step_dir(self.out, self.step)
        save_adapter_checkpoint(path, self.targets, self.peft, self.base, self.step,
                                extra_writer=state_writer(self.rank, self.optimizer, self.step, self.position))
        if self.rank == 0:
            prune(self.out, self.cfg.output.keep_last)
        dist.barrier()
        return path

    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal else 0.0])
        dist.all_reduce(flag)  # every rank stops at the same step
        return flag.item() > 0

    # ---- one step ----------------------------------------------------------------------
    def _eval_batches(self, tokens, masks, count: int):
        """This data-parallel rank's share of the first ``count`` samples, padded with
        zero-mask copies to the same whole number of micro-batches on every rank: pipeline
        stages exchange fixed-shape tensors, and every rank must run the same collectives."""
        mb = self.cfg.train.micro_batch
        count = min(count, len(tokens))
        per_rank = math.ceil(count / (self.dp * mb)) * mb
        idx = list(range(count))[self.dp_rank :: self.dp]
        pad = per_rank - len(idx)
        tokens, masks = tokens[idx + [0] * pad], masks[idx + [0] * pad].clone()
        masks[len(idx):] = 0
        return self._micro_batches(tokens, masks, list(range(per_rank)))

    def _micro_batches(self, tokens, masks, indices):
        mb = self.cfg.train.micro_batch
        return [D.make_batch(tokens[indices[i : i + mb]], masks[indices[i : i + mb]]) for i in range(0, len(indices), mb)]

    def _schedule(self, batches, loss_scale: float, forward_only: bool):
        """Megatron's forward(-backward) over micro-batches; returns the summed masked loss on
        the last stage (scaled by ``loss_scale``), broadcast to every rank."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        num = len(batches)

        def step_fn(iterator, model):
            b = next(iterator)
            pos = torch.arange(b.tokens.shape[1]).unsqueeze(0).expand_as(b.tokens)
            dev = next(model.parameters()).device
            out = model(b.tokens.to(dev), pos.to(dev), None, labels=b.labels.to(dev))

            def loss_func(per_token):
                total = (per_token.float() * b.mask.to(per_token.device)).sum() * loss_scale
                # megatron divides by the number of micro-batches; undo it so the sum is exact
                return total * num, {"loss_sum": total.detach()}

            return out, loss_func

        seq = self.cfg.train.seq_len
        results = get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=iter(batches), model=[self.model], num_microbatches=num,
            seq_length=seq, micro_batch_size=self.cfg.train.micro_batch, forward_only=forward_only,
        )
        return self._from_last_stage(sum(r["loss_sum"].item() for r in results) if results else 0.0)

    def _from_last_stage(self, *values: float):
        """Sum ``values`` over data-parallel ranks and give the last stage's sums to every stage."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.ps.get_data_parallel_group())
        last = self.ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(t, src=last, group=self.ps.get_pipeline_model_parallel_group())
        return t.item() if len(values) == 1 else t.tolist()

    def _global_tokens(self, batches) -> float:
        n = torch.tensor([sum(float(b.mask.sum()) for b in batches)], dtype=torch.float64)
        dist.all_reduce(n, group=self.ps.get_data_parallel_group())
        return n.item()

    def _clip_and_norm(self) -> float:
        sq = torch.zeros(1, dtype=torch.float64)
        for p in self.norm_params:
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum().cpu()
        dist.all_reduce(sq, group=self.ps.get_model_parallel_group())
        norm = sq.sqrt().item()
        clip = self.cfg.train.clip_grad
        if clip > 0 and norm > clip:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(clip / (norm + 1e-6))
        return norm

    def train_step(self) -> dict:
        t = self.cfg.train
        start = time.time()
        indices = self.order.step_indices(self.position, t.global_batch, self.dp_rank, self.dp)
        batches = self._micro_batches(*self.data.train, indices)
        tokens = self._global_tokens(batches)
        self.model.train()
        for p in self.params:
            p.grad = None
        loss = self._schedule(batches, 1.0 / max(tokens, 1.0), forward_only=False)
        if self.dp > 1:  # one flat all-reduce of all adapter gradients per step
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in self.params])
            dist.all_reduce(flat, group=self.ps.get_data_parallel_group())
            for p, g in zip(self.params, flat.split([p.numel() for p in self.params])):
                p.grad.copy_(g.view_as(p))
        norm = self._clip_and_norm()
        lr = lr_at(self.step, self.total, t.lr, t.warmup, t.schedule, t.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if not math.isfinite(loss) or not math.isfinite(norm):
            raise FloatingPointError(f"non-finite loss {loss} / grad norm {norm} at step {self.step + 1}")
        self.optimizer.step()
        self.step += 1
        self.position += t.global_batch
        elapsed = time.time() - start
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "loss_tokens": tokens,
                "step_time_s": round(elapsed, 4), "tokens_per_s": t.global_batch * t.seq_len / elapsed,
                "epoch": round(self.position / len(self.data.train[0]), 4)}

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self) -> float | None:
        if self.data.valid is None:
            return None
        tokens, masks = self.data.valid
        batches = self._eval_batches(tokens, masks, self.cfg.train.eval_batches * self.cfg.train.micro_batch)
        total = self._global_tokens(batches)
        self.model.eval()
        return self._schedule(batches, 1.0 / max(total, 1.0), forward_only=True)

    @torch.no_grad()
    def forgetting_loss(self) -> float | None:
        """Cross-entropy of the fine-tuned model's next-token distribution against the base
        model's (the same model with the adapter's delta off), per token (paper section 5)."""
        if self.data.forgetting is None:
            return None
        from megatron.core.pipeline_parallel import get_forward_backward_func

        tokens, masks = self.data.forgetting
        batches = self._eval_batches(tokens, masks, len(tokens))
        self.model.eval()

        def run():
            def step_fn(iterator, model):
                b = next(iterator)
                pos = torch.arange(b.tokens.shape[1]).unsqueeze(0).expand_as(b.tokens)
                dev = next(model.parameters()).device
                out = model(b.tokens.to(dev), pos.to(dev), None)
                return out, lambda o: (o.sum() * 0.0, {"logp": torch.log_softmax(gather_logits(self.model, o).float(), -1)})

            return get_forward_backward_func()(
                forward_step_func=step_fn, data_iterator=iter(batches), model=[self.model], num_microbatches=len(batches),
                seq_length=self.cfg.train.seq_len, micro_batch_size=self.cfg.train.micro_batch, forward_only=True)

        with adapters_disabled(self.model):
            base = run()
        tuned = run()
        total, count = 0.0, 0.0
        for b_out, t_out, batch in zip(base, tuned, batches):
            p_base = b_out["logp"].exp()
            mask = batch.mask.to(p_base.device)  # [b, s]; 0 on padding samples
            total += -((p_base * t_out["logp"]).sum(-1) * mask).sum().item()
            count += mask.sum().item()
        s, n = self._from_last_stage(total, count)
        return s / max(n, 1.0)

    def evaluate(self) -> None:
        record = {"step": self.step, "event": "eval"}
        v = self.validation_loss()
        f = self.forgetting_loss()
        if v is not None:
            record["valid_loss"] = v
        if f is not None:
            record["forgetting_loss"] = f
        if len(record) > 2:
            self.metrics.log(record)

    # ---- the run -----------------------------------------------------------------------
    def run(self) -> dict:
        self._install_signal_handlers()  # first: a stop request during the (long) init still saves
        self.resume_or_start()
        t, o = self.cfg.train, self.cfg.output
        if self.total == 0:
            path = self.save()
            self.metrics.log({"event": "saved initial adapters (train.iters=0)", "checkpoint": path})
            return {"step": 0, "checkpoint": path}
        if self.step == 0 and self.rank == 0:
            print(f"training {self.peft.method} r={self.peft.rank} for {self.total} steps "
                  f"(TP={self.tp} PP={self.ps.get_pipeline_model_parallel_world_size()} DP={self.dp}, "
                  f"{self.num_micro} micro-batches of {t.micro_batch} per step)", flush=True)
        last = {}
        while self.step < self.total:
            try:
                last = self.train_step()
            except FloatingPointError as exc:
                self.metrics.log({"event": "stopped", "reason": str(exc), "step": self.step})
                raise SystemExit(f"stopping: {exc}; the last good checkpoint is kept in {self.out}")
            if self.step % t.log_every == 0 or self.step == self.total:
                self.metrics.log(last)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total:
                self.evaluate()
            if o.save_every and self.step % o.save_every == 0 and self.step < self.total:
                self.save()
            if self._stop_requested():
                path = self.save()
                self.metrics.log({"event": "stopped", "reason": f"received {self._stop_signal or 'a stop signal'}",
                                  "step": self.step, "checkpoint": path})
                if self.rank == 0:
                    print(f"saved {path} after a stop signal; rerun the same command to resume", flush=True)
                return {"step": self.step, "checkpoint": path, "stopped": True}
        self.evaluate()
        path = self.save()
        self.metrics.log({"event": "done", "step": self.step, "checkpoint": path})
        return {"step": self.step, "checkpoint": path, "loss": last.get("loss")}


def run(cfg: RunConfig) -> dict:
    init_distributed(cfg)
    trainer = Trainer(cfg)
    return trainer.run()
