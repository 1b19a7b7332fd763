"""One small module per method. Every module of this package is imported here, and its
``@register``-ed class registers the method: adding a method is adding a file."""

import importlib
import pkgutil

from .base import Factors, InitContext, Variant, available, get_variant, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Factors", "InitContext", "Variant", "available", "get_variant", "register"]
