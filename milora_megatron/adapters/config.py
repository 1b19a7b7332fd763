"""What to adapt and how: the ``peft.*`` section of a run's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..mapping import HF_TARGETS, PAPER_TARGETS
from ..errors import ConfigError


def option(default, help: str, **kwargs):
    """A config field with its documentation (``--help`` is generated from it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class AdapterConfig:
    """The ``peft.*`` section of a run's config: what to adapt and how."""

    method: str = option("milora", "adapter method: one of adapters/variants/ (lora, pissa, milora, mica)")
    rank: int = option(32, "adapter rank r")
    alpha: float | None = option(None, "scale numerator, s = alpha / rank; empty/null: alpha = rank")
    dropout: float = option(0.05, "dropout on the adapter input (the paper's 0.05)")
    targets: list[str] = option(list(PAPER_TARGETS), "HF projections to adapt (q_proj, k_proj, v_proj, o_proj, "
                                                     "gate_proj, up_proj, down_proj)")
    moe_targets: Literal["all", "dense", "experts"] = option(
        "all", "in a mixture-of-experts model, which MLPs the MLP targets (gate_proj, up_proj, down_proj) adapt: "
               "all (the dense MLP layers and every expert of the sparse ones, each expert its own adapter) | "
               "dense (the dense MLP layers only) | experts (the experts only); the router is never adapted")
    residual: Literal["branch", "merge"] = option(
        "branch", "PiSSA/MiLoRA: branch keeps W bit-identical and subtracts a frozen s B0 A0 branch; merge "
                  "writes W - s B0 A0 into W (as the paper and PEFT; in bf16 it rounds W)")
    svd_backend: Literal["gram", "exact"] = option("gram", "gram (distributed fp64 Gram + eigh) | exact "
                                                           "(gathers W, fp64 SVD; debugging only)")
    init_cache: str | None = option(
        None, "folder caching the singular triplets per base checkpoint, side (minor/principal), rank and "
              "svd_backend: later runs on the same base (a sweep, another method of the same side, another "
              "TP/PP layout) skip the SVD; entries are checksummed and checked against the weights, a bad "
              "one is recomputed; empty/null: no cache")

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = float(self.rank)
        unknown = [t for t in self.targets if t not in HF_TARGETS]
        if unknown:
            raise ConfigError(f"unknown peft target(s) {unknown}; valid targets: {list(HF_TARGETS)}")
        if not self.targets:
            raise ConfigError("peft.targets is empty")
        if self.rank < 1:
            raise ConfigError(f"peft.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"peft.alpha must be > 0 (the scale is alpha / rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.moe_targets not in ("all", "dense", "experts"):
            raise ConfigError(f"peft.moe_targets must be 'all', 'dense' or 'experts', got {self.moe_targets!r}")
        if self.residual not in ("branch", "merge"):
            raise ConfigError(f"peft.residual must be 'branch' or 'merge', got {self.residual!r}")
        if self.svd_backend not in ("gram", "exact"):
            raise ConfigError(f"peft.svd_backend must be 'gram' or 'exact', got {self.svd_backend!r}")
        from .variants import get_variant

        get_variant(self.method)  # fails early with the list of methods

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank
