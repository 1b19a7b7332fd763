"""A method is an initialisation: given the layer's shard (and its singular subspace when the
method needs one) it returns this rank's initial A and B, and says which of them train."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...subspace import Subspace, Which
from ...errors import ConfigError


@dataclass
class InitContext:
    """Everything a variant may look at, for one target on one rank (float64 math)."""

    name: str
    shard_dim: int  # 0: B split by output rows (ColumnParallel); 1: A split by input columns
    local_shape: tuple[int, int]  # this rank's (out, in) of the target's weight
    full_shape: tuple[int, int]
    rank: int
    scaling: float
    tp_rank: int
    tp_size: int
    tp_group: object
    seed: int
    subspace: Subspace | None = None


@dataclass
class Factors:
    a: torch.Tensor  # this rank's A (r x in_local), float64
    b: torch.Tensor  # this rank's B (out_local x r), float64


class Variant(abc.ABC):
    """A method: everything the rest of the project knows of it is declared here."""

    name: ClassVar[str]  # the config value, e.g. "milora"
    display_name: ClassVar[str]  # for tables and plots, e.g. "MiLoRA"
    subspace: ClassVar[Which | None] = None  # which singular triplets init needs, if any
    paper_alpha_per_rank: ClassVar[float] = 1.0  # alpha / rank in the papers' settings
    train_a: ClassVar[bool] = True
    train_b: ClassVar[bool] = True
    # True when W must lose s*B0*A0 so the model starts unchanged (PiSSA, MiLoRA): the
    # adapter keeps A0, B0 beside A, B
    subtracts_initial: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, ctx: InitContext) -> Factors:
        """This rank's initial factors."""


_REGISTRY: dict[str, type[Variant]] = {}


def register(cls: type[Variant]) -> type[Variant]:
    _REGISTRY[cls.name] = cls
    return cls


def get_variant(name: str) -> Variant:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown peft method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def available() -> list[str]:
    """The registered methods' names, sorted."""
    return sorted(_REGISTRY)


def svd_factors(ctx: InitContext) -> Factors:
    """B = U sqrt(S/s), A = sqrt(S/s) V^T, so that s*B*A = U S V^T (PiSSA and MiLoRA)."""
    sub = ctx.subspace
    root = (sub.sigma / ctx.scaling).sqrt()
    return Factors(a=(sub.v * root).t().contiguous(), b=sub.u * root)

