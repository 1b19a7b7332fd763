"""How a Hugging Face decoder maps onto megatron-core: projection names, the fused layouts
of megatron's linears, tensor names and TP slices. A leaf package (torch only, no
megatron-core): the converters, the checkpoint loader, the adapters and the analysis tools
all read these facts from here, in both directions."""

from .fused import FusedLayout
from .decoder import layer_layouts
from .projections import HF_TARGETS, PAPER_TARGETS, PROJECTIONS, Projection

__all__ = ["FusedLayout", "HF_TARGETS", "PAPER_TARGETS", "PROJECTIONS", "Projection", "layer_layouts"]
