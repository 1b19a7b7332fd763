"""Low-rank adapters for megatron-core's tensor-parallel linears (LoRA, PiSSA, MiLoRA, MiCA)."""

from .apply import AdaptedTarget, apply_adapters
from .config import HF_TARGETS, PAPER_TARGETS, AdapterConfig
from .layer import AdaptedColumnParallelLinear, AdaptedRowParallelLinear, adapters_disabled
from .variants import available, get_variant

__all__ = [
    "AdaptedColumnParallelLinear",
    "AdaptedRowParallelLinear",
    "AdaptedTarget",
    "AdapterConfig",
    "HF_TARGETS",
    "PAPER_TARGETS",
    "adapters_disabled",
    "apply_adapters",
    "available",
    "get_variant",
]
