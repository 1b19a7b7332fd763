import torch

from ...subspace import left_orthonormal
from .base import Factors, InitContext, Variant, register


@register
class MiCA(Variant):
    """Minor component adaptation (arXiv 2604.01694, as PEFT implements it): B = the r left
    singular vectors with the smallest singular values, orthonormal and frozen; A = 0 is the
    only trained factor; W is untouched."""

    name = "mica"
    display_name = "MiCA"
    subspace = "minor"
    train_b = False

    def init(self, ctx: InitContext) -> Factors:
        b = left_orthonormal(ctx.subspace, ctx.tp_group)
        a = torch.zeros(ctx.rank, ctx.local_shape[1], dtype=torch.float64)
        return Factors(a=a, b=b)
