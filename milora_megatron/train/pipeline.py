"""One forward step, run through megatron-core's pipeline schedule, for training and for
evaluation alike (1F1B with PP > 1; gradient accumulation over the micro-batches)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..device import all_reduce_scalars, collective_device
from .batches import Batch, packed_attention_mask
from .parallel import ParallelGroups


def forward(model, batch: Batch, labels: bool):
    """The model on one micro-batch: per-token losses [b, s] with ``labels``, else this TP
    rank's vocabulary shard of the logits [b, s, V/tp] (last stage; hidden states before it).

    Packed samples attend within their own example only. Their positions restart per
    example too; megatron's rotary embedding is applied by absolute index, but with
    attention confined to one example only position differences enter the scores, so the
    result is the unpacked one (tested to 1e-5)."""
    device = next(model.parameters()).device
    tokens = batch.tokens.to(device, non_blocking=True)
    if batch.positions is None:
        positions, mask = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens), None
    else:
        positions = batch.positions.to(device, non_blocking=True)
        mask = packed_attention_mask(positions)
    return model(tokens, positions, mask, labels=batch.labels.to(device, non_blocking=True) if labels else None)


def masked_loss_step(tokens: float, num_micro: int, loss_scale: float = 1.0) -> Callable:
    """A step whose loss is sum(per-token loss x mask) / ``tokens`` (the scored tokens of the
    whole global batch, so any TP/PP/DP/micro-batch split gives the same gradient), times
    fp16's ``loss_scale`` for the backward; ``loss_sum`` is the unscaled share of the mean."""
    tokens = max(tokens, 1.0)

    def step(batch: Batch, model):
        out = forward(model, batch, labels=True)

        def loss_func(per_token):
            share = (per_token.float() * batch.mask.to(per_token.device, non_blocking=True)).sum() / tokens
            # megatron divides each micro-batch's loss by their number; undo it so the sum is exact
            return share * (loss_scale * num_micro), {"loss_sum": share.detach()}

        return out, loss_func

    return step


def scored_tokens(batches: list[Batch], groups: ParallelGroups) -> float:
    """Scored (mask 1) label positions of this rank's ``batches``, summed over data-parallel replicas."""
    return all_reduce_scalars([sum(float(b.mask.sum()) for b in batches)], groups.dp)[0]


def run_schedule(model, items: Sequence, step: Callable, seq_len: int, micro_batch: int,
                 forward_only: bool) -> list[dict]:
    """``step(item, model) -> (output, loss_func)`` over ``items`` through megatron's
    schedule; the loss functions' dicts, on the last stage (empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=lambda iterator, chunk: step(next(iterator), chunk), data_iterator=iter(items),
        model=[model], num_microbatches=len(items), seq_length=seq_len, micro_batch_size=micro_batch,
        forward_only=forward_only,
    )


def sums_from_last_stage(results: list[dict], keys: Sequence[str], groups: ParallelGroups) -> list[float]:
    """Sum ``keys`` over the micro-batches and the data-parallel replicas, and give the last
    pipeline stage's totals to every stage: one reduction, one broadcast, one host sync."""
    return last_stage_totals(results, keys, groups).tolist()


def last_stage_totals(results: list[dict], keys: Sequence[str], groups: ParallelGroups) -> torch.Tensor:
    """``sums_from_last_stage`` as a tensor on the collective device, without the host sync
    (the caller reads it together with whatever else the step needs)."""
    device = collective_device(groups.dp)
    if results:
        totals = torch.stack([torch.stack([r[k].to(torch.float64) for k in keys]) for r in results]).sum(0)
        totals = totals.to(device)
    else:
        totals = torch.zeros(len(keys), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals, group=groups.dp)
        dist.broadcast(totals, src=groups.pp_last_rank, group=groups.pp)
    return totals
