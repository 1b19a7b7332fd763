import math

import torch

from .base import Factors, InitContext, Variant, register


@register
class LoRA(Variant):
    """Kaiming-uniform A (as nn.Linear and PEFT), zero B: the update starts at zero."""

    name = "lora"
    display_name = "LoRA"
    paper_alpha_per_rank = 2.0  # LoRA's usual alpha = 2r (the MiLoRA paper's baseline)

    def init(self, ctx: InitContext) -> Factors:
        full_out, full_in = ctx.full_shape
        # The whole A is drawn from a per-target seed and then sliced, so it is the same at any TP size.
        gen = torch.Generator().manual_seed(_stable_seed(ctx.seed, ctx.name))
        bound = 1.0 / math.sqrt(full_in)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) weight
        a = (torch.rand(ctx.rank, full_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        if ctx.shard_dim == 1:
            cols = ctx.local_shape[1]
            a = a[:, ctx.tp_rank * cols : (ctx.tp_rank + 1) * cols]
        b = torch.zeros(ctx.local_shape[0], ctx.rank, dtype=torch.float64)
        return Factors(a=a.contiguous(), b=b)


def _stable_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
