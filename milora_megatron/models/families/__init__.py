"""The decoder families a base checkpoint can come from, one small module each.

A family reads an HF ``config.json``: it validates what megatron's GPT layer cannot
express (and refuses it, naming the key), and says what its layers hold beyond Llama's
(``qkv_bias``, ``qk_norm``) and how far attention reaches (``sliding_window``). Everything
else (names, fused layouts, TP/PP, adapters) is shared. Adding a family is a module here
with a ``@register``ed ``Family`` subclass.
"""

from __future__ import annotations

import importlib
import pkgutil

from ...errors import CheckpointError
from .base import Family, register, registered

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def family_for(cfg: dict) -> Family:
    """The family of an HF config dict; a clear refusal naming the architecture otherwise."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    for family in registered():
        if model_type == family.model_type and (not archs or set(archs) & set(family.architectures)):
            return family
    supported = ", ".join(f"{a} (model_type {f.model_type!r})" for f in registered() for a in f.architectures)
    raise CheckpointError(f"unsupported architecture {archs or model_type!r} (model_type {model_type!r}); "
                     f"supported: {supported}")


__all__ = ["Family", "family_for", "register", "registered"]
