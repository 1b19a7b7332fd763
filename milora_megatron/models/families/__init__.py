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
from .base import Family, Wrapper, register, registered

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


def wrapper_for(cfg: dict) -> tuple[Family, Wrapper] | None:
    """The family and wrapper of a multimodal config whose text decoder a family reads."""
    archs = set(cfg.get("architectures") or [])
    for family in registered():
        for wrapper in family.wrappers:
            if wrapper.architecture in archs:
                return family, wrapper
    return None


def text_config(cfg: dict, family: Family, wrapper: Wrapper) -> dict:
    """A wrapper's ``text_config`` as the config of the family's own text model."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{wrapper.architecture} config has no text_config (a damaged config.json)")
    out = {**text, "architectures": [family.architectures[0]], "model_type": family.model_type}
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in cfg:
        out["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return out


__all__ = ["Family", "Wrapper", "family_for", "register", "registered", "text_config", "wrapper_for"]
