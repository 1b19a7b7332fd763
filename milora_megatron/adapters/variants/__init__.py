"""One small module per method; importing them registers them."""

from . import lora, mica, milora, pissa  # noqa: F401  (registration)
from .base import Factors, InitContext, Variant, available, get_variant, register

__all__ = ["Factors", "InitContext", "Variant", "available", "get_variant", "register"]
