"""What to adapt and how: the ``peft.*`` section of a run's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..mapping import HF_TARGETS, PAPER_TARGETS



@dataclass
class AdapterConfig:
    method: str = "milora"  # lora | pissa | milora | mica (see adapters/variants/)
    rank: int = 32
    alpha: float | None = None  # None: alpha = rank, so the scale s = alpha / rank is 1
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(PAPER_TARGETS))
    # PiSSA/MiLoRA must remove s*B0*A0 from W so the model starts unchanged:
    # "branch" keeps W bit-identical and subtracts a frozen s*B0*A0 branch (exact at init,
    # default: see README "Residual modes"); "merge" writes W - s*B0*A0 into W (paper/PEFT).
    residual: Literal["branch", "merge"] = "branch"
    svd_backend: Literal["gram", "exact"] = "gram"  # "exact": gathered float64 SVD, debugging only
    seed: int = 1234  # LoRA's random A; identical at any TP size

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = float(self.rank)
        unknown = [t for t in self.targets if t not in HF_TARGETS]
        if unknown:
            raise ValueError(f"unknown peft target(s) {unknown}; valid targets: {list(HF_TARGETS)}")
        if not self.targets:
            raise ValueError("peft.targets is empty")
        if self.rank < 1:
            raise ValueError(f"peft.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.residual not in ("branch", "merge"):
            raise ValueError(f"peft.residual must be 'branch' or 'merge', got {self.residual!r}")
        from .variants import get_variant

        get_variant(self.method)  # fails early with the list of methods

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank
