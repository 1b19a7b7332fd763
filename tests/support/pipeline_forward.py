"""Full-vocabulary logits from a megatron model on any TP x PP, through megatron's own
pipeline schedule (forward only)."""

from __future__ import annotations

import functools

import torch


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits [batch, seq, vocab] on the last pipeline stage, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from milora_megatron.models.decoder import gather_logits

    def loss_func(output):
        return output.sum() * 0.0, {"logits": gather_logits(model, output)}

    def step(data_iterator, chunk):
        batch = next(data_iterator)
        pos = torch.arange(batch.shape[1]).unsqueeze(0).expand_as(batch)
        return chunk(batch, pos, None), functools.partial(loss_func)

    model.eval()
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
        )
    return out[0]["logits"] if ps.is_pipeline_last_stage() else None
