"""Learning-rate schedule: linear warmup, then linear or cosine decay to ``min_lr``."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, lr: float, warmup: int, schedule: str, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (lr - min_lr) * (1.0 - progress)
