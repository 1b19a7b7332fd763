"""What to adapt and how: the ``peft.*`` section of a run's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..mapping import HF_TARGETS, PAPER_TARGETS
from ..schema import Section, option, require


def _methods() -> list[str]:
    from .variants import available

    return available()


@dataclass
class AdapterConfig(Section):
    """The ``peft.*`` section of a run's config: what to adapt and how."""

    name: ClassVar[str] = "peft"

    method: str = option("milora", "adapter method: a module of adapters/variants/", choices=_methods,
                         fixed_on_resume=True)
    rank: int = option(32, "adapter rank r", fixed_on_resume=True)
    alpha: float | None = option(None, "scale numerator, s = alpha / rank; empty/null: alpha = rank",
                                 fixed_on_resume=True)
    dropout: float = option(0.05, "dropout on the adapter input (the paper's 0.05)")
    targets: list[str] = option(list(PAPER_TARGETS), "HF projections to adapt (q_proj, k_proj, v_proj, o_proj, "
                                                     "gate_proj, up_proj, down_proj)", fixed_on_resume=True)
    moe_targets: Literal["all", "dense", "experts"] = option(
        "all", "in a mixture-of-experts model, which MLPs the MLP targets (gate_proj, up_proj, down_proj) adapt: "
               "all (the dense MLP layers and every expert of the sparse ones, each expert its own adapter) | "
               "dense (the dense MLP layers only) | experts (the experts only); the router is never adapted",
        fixed_on_resume=True)
    residual: Literal["branch", "merge"] = option(
        "branch", "PiSSA/MiLoRA: branch keeps W bit-identical and subtracts a frozen s B0 A0 branch; merge "
                  "writes W - s B0 A0 into W (as the paper and PEFT; in bf16 it rounds W)", fixed_on_resume=True)
    svd_backend: Literal["gram", "exact"] = option("gram", "gram (distributed fp64 Gram + eigh) | exact "
                                                           "(gathers W, fp64 SVD; debugging only)")
    init_cache: str | None = option(
        None, "folder caching the singular triplets per base checkpoint, side (minor/principal), rank and "
              "svd_backend: later runs on the same base (a sweep, another method of the same side, another "
              "TP/PP layout) skip the SVD; entries are checksummed and checked against the weights, a bad "
              "one is recomputed; empty/null: no cache")

    def check(self):
        if self.alpha is None:
            self.alpha = float(self.rank)
        unknown = [t for t in self.targets if t not in HF_TARGETS]
        require(not unknown, f"unknown peft target(s) {unknown}; valid targets: {list(HF_TARGETS)}")
        require(bool(self.targets), "peft.targets is empty")
        require(self.rank >= 1, f"peft.rank must be >= 1, got {self.rank}")
        require(self.alpha > 0, f"peft.alpha must be > 0 (the scale is alpha / rank), got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"peft.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank
