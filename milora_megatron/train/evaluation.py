"""Validation loss and the paper's forgetting loss during training.

Both return scalars per micro-batch and never gather the vocabulary: the forgetting loss
is computed on each TP rank's vocabulary shard of the logits (a vocab-parallel softmax),
and only one micro-batch's base-model log-probabilities are held at a time. (Gathering
full float32 log-probabilities for every evaluation micro-batch took ~1 GB each at a 128k
vocabulary and seq 2048, on every TP rank.)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..adapters.layer import adapters_disabled, set_adapters_enabled
from .batches import Batch, micro_batches
from .parallel import ParallelGroups
from .pipeline import forward, masked_loss_step, run_schedule, scored_tokens, sums_from_last_stage


def eval_micro_batches(tokens, masks, count: int, micro_batch: int, groups: ParallelGroups,
                       positions=None) -> list[Batch]:
    """This data-parallel rank's share of the first ``count`` samples, padded with zero-mask
    copies to the same whole number of micro-batches on every rank: pipeline stages
    exchange fixed-shape tensors, and every rank must run the same collectives."""
    count = min(count, len(tokens))
    per_rank = math.ceil(count / (groups.dp_size * micro_batch)) * micro_batch
    idx = list(range(count))[groups.dp_rank :: groups.dp_size]
    pad = per_rank - len(idx)
    tokens, masks = tokens[idx + [0] * pad], masks[idx + [0] * pad].clone()
    masks[len(idx):] = 0
    positions = None if positions is None else positions[idx + [0] * pad]
    return micro_batches(tokens, masks, list(range(per_rank)), micro_batch, positions)


@torch.no_grad()
def validation_loss(model, batches: list[Batch], groups: ParallelGroups, seq_len: int, micro_batch: int) -> float:
    """Mean next-token cross-entropy over the scored tokens (megatron's vocab-parallel loss)."""
    tokens = scored_tokens(batches, groups)
    model.eval()
    results = run_schedule(model, batches, masked_loss_step(tokens, len(batches)), seq_len, micro_batch,
                           forward_only=True)
    return sums_from_last_stage(results, ["loss_sum"], groups)[0]


def vocab_parallel_log_softmax(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """log-softmax over a vocabulary split across the TP group (each rank its shard), float32."""
    logits = logits.float()
    top = logits.max(dim=-1, keepdim=True).values
    if dist.is_initialized() and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - top
    total = shifted.exp().sum(dim=-1, keepdim=True)
    if dist.is_initialized() and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(total, group=tp_group)
    return shifted - total.log()


@torch.no_grad()
def forgetting_loss(model, batches: list[Batch], groups: ParallelGroups, seq_len: int, micro_batch: int) -> float:
    """Per-token cross-entropy of the fine-tuned model's next-token distribution against the
    base model's (the same model with the adapters' delta off): -sum_v p_base(v) log p_ft(v),
    the paper's forgetting loss (section 5).

    Each micro-batch runs twice in a row, base then fine-tuned, in one schedule: every stage
    switches the adapters for the forward it is about to run, and the last stage keeps the
    base log-probabilities of the current micro-batch only."""
    model.eval()
    held = {}

    def step(item, chunk):
        batch, tuned = item
        set_adapters_enabled(chunk, tuned)
        out = forward(chunk, batch, labels=False)

        def loss_func(logits):
            logp = vocab_parallel_log_softmax(logits, groups.tp)
            zero = logits.new_zeros((), dtype=torch.float32)
            if not tuned:
                held["base"] = logp
                return zero, {"ce": zero, "count": zero}
            per_token = -(held.pop("base").exp() * logp).sum(dim=-1)  # this rank's vocabulary share
            if groups.tp_size > 1:
                dist.all_reduce(per_token, group=groups.tp)
            mask = batch.mask.to(per_token.device)
            return zero, {"ce": (per_token * mask).sum(), "count": mask.sum()}

        return out, loss_func

    items = [(b, tuned) for b in batches for tuned in (False, True)]
    with adapters_disabled(model):  # restores the adapters' state afterwards
        results = run_schedule(model, items, step, seq_len, micro_batch, forward_only=True)
    total, count = sums_from_last_stage(results, ["ce", "count"], groups)
    return total / max(count, 1.0)
