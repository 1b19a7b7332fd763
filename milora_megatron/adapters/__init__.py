"""Low-rank adapters for megatron-core's tensor-parallel linears (LoRA, PiSSA, MiLoRA, MiCA).

This package imports without megatron-core: its config and the method registry are here.
The megatron-bound modules are imported explicitly where they are used:
``adapters.apply`` (apply_adapters, AdaptedTarget) and ``adapters.layer`` (the adapted
linears, adapters_disabled).
"""

from .config import AdapterConfig
from .variants import available, get_variant

__all__ = ["AdapterConfig", "available", "get_variant"]
