from .base import Factors, InitContext, Variant, register, svd_factors


@register
class PiSSA(Variant):
    """Principal singular components: A, B from the top-r triplets; W keeps the rest."""

    name = "pissa"
    display_name = "PiSSA"
    subtracts_initial = True
    subspace = "principal"

    def init(self, ctx: InitContext) -> Factors:
        return svd_factors(ctx)
