from .base import Factors, InitContext, Variant, register, svd_factors


@register
class MiLoRA(Variant):
    """Minor singular components (arXiv 2406.09044): A, B from the bottom-r triplets, so
    training starts in the subspace W uses least; W keeps its principal part."""

    name = "milora"
    display_name = "MiLoRA"
    subtracts_initial = True
    subspace = "minor"

    def init(self, ctx: InitContext) -> Factors:
        return svd_factors(ctx)
