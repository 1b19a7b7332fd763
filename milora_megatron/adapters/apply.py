"""The converter: find the target projections in a megatron model, adapt them in place and
initialise every adapter with its method (one batched, distributed subspace pass)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mapping import PROJECTIONS, FusedLayout, layer_layouts
from ..mapping.experts import EXPERT_PROJECTIONS, ExpertNames, SparseMLP
from ..subspace import ShardedWeight, check_rank, extract_subspaces, full_shape
from .config import AdapterConfig
from .init_cache import cached_subspaces
from .layer import TargetAdapter, adapt_in_place
from .variants import InitContext, get_variant
from ..errors import ConfigError


@dataclass
class AdaptedTarget:
    name: str  # HF module name, e.g. "model.layers.3.self_attn.q_proj" (an expert's: "...mlp.experts.5.up_proj")
    target: str  # "q_proj"
    module: torch.nn.Module  # the adapted megatron linear holding it
    layout: FusedLayout  # the module's layout on this rank
    # an expert's: the ranks holding the same expert (megatron's expert-data-parallel group),
    # which split its eigensolves and sum its gradients; None for a dense target
    expert_dp_group: object = None

    @property
    def is_expert(self) -> bool:
        return bool(getattr(self.module, "is_expert", False))

    @property
    def shard_dim(self) -> int:
        return self.layout.shard_dim

    def local_weight(self) -> torch.Tensor:
        view = self.layout.view(self.module.weight, self.target)
        return view.reshape(-1, view.shape[-1]) if self.shard_dim == 0 else self.module.weight

    @property
    def adapter(self) -> TargetAdapter:
        return self.module.adapters[self.target]

    def factor_split_dim(self, factor: str) -> int | None:
        """The dim of ``lora_A``/``lora_B`` (or A0/B0) split over TP, None if each rank holds it
        whole: column targets split B's rows, row targets A's columns."""
        if self.shard_dim == 0:
            return 0 if factor.startswith("lora_B") else None
        return 1 if factor.startswith("lora_A") else None


def _transformer_layers(model_chunks):
    from megatron.core.transformer.transformer_layer import TransformerLayer

    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, TransformerLayer):
                yield module


def find_targets(model_chunks, cfg: AdapterConfig, tp_size: int) -> list[AdaptedTarget]:
    """Adapt the target linears in place (no initialisation yet); global HF layer indices.

    In a sparse (MoE) layer the MLP targets are every local expert's own projections, each
    named as the family names it on disk (``peft.moe_targets`` picks dense MLPs, experts or
    both)."""
    found = []
    for chunk in model_chunks:
        shape = getattr(chunk, "decoder_shape", None)
        if cfg.moe_targets != "all" and not getattr(shape, "experts", 0):
            raise ConfigError(f"peft.moe_targets={cfg.moe_targets!r} is for mixture-of-experts models and this model "
                              "is dense: leave it at 'all'")
        names = getattr(shape, "expert_names", ExpertNames())
        for layer in _transformer_layers([chunk]):
            found += _layer_targets(layer, cfg, tp_size, names)
    if not found and cfg.moe_targets != "all":
        raise ConfigError(f"peft.targets {cfg.targets} with peft.moe_targets={cfg.moe_targets!r} select no linear of "
                          "this pipeline stage's layers")
    if not found:
        raise ValueError("no target projections found in the model (is this a megatron GPTModel stage?)")
    return found


def _layer_targets(layer, cfg: AdapterConfig, tp_size: int, names: ExpertNames) -> list[AdaptedTarget]:
    index = layer.layer_number - 1  # megatron's layer_number is global and 1-based
    c = layer.config
    if "gate_proj" in cfg.targets and not c.gated_linear_unit:
        raise ConfigError("gate_proj is a target but the model's MLP is not gated (no SwiGLU)")
    sparse = hasattr(layer.mlp, "experts")
    layouts = layer_layouts(c.num_attention_heads, c.num_query_groups or c.num_attention_heads, c.kv_channels,
                            c.ffn_hidden_size, c.hidden_size, c.gated_linear_unit)
    found = []
    for target in cfg.targets:
        proj = PROJECTIONS[target]
        if target in EXPERT_PROJECTIONS:
            if cfg.moe_targets == ("dense" if sparse else "experts"):
                continue
            if sparse:
                found += _expert_targets(layer.mlp.experts, index, target, c, cfg, names)
                continue
        module = layer.get_submodule(proj.megatron_module)
        found.append(_adapted(proj.hf_module(index), target, module, layouts[proj.megatron_module].local(tp_size), cfg))
    return found


def _expert_targets(experts, layer_index: int, target: str, c, cfg: AdapterConfig,
                    names: ExpertNames) -> list[AdaptedTarget]:
    """``target`` in each of this rank's experts (megatron's ``SequentialMLP``): global expert
    indices, layouts sliced over the expert-tensor-parallel group."""
    module_name = PROJECTIONS[target].megatron_module.removeprefix("mlp.")  # linear_fc1 / linear_fc2
    layout = SparseMLP(c.num_moe_experts, c.moe_ffn_hidden_size, c.hidden_size).layouts()[module_name]
    first = experts.ep_group.rank() * experts.num_local_experts if experts.ep_group is not None else 0
    etp = experts.tp_group.size() if experts.tp_group is not None else 1
    out = []
    for local, expert in enumerate(experts.local_experts):
        name = f"model.layers.{layer_index}.{names.expert_module(first + local, target)}"
        out.append(_adapted(name, target, expert.get_submodule(module_name), layout.local(etp), cfg,
                            expert_dp_group=experts.dp_group))
    return out


def _adapted(name: str, target: str, module, layout: FusedLayout, cfg: AdapterConfig,
             expert_dp_group=None) -> AdaptedTarget:
    if layout.rows != module.weight.shape[0]:
        raise ValueError(f"{name}: its linear holds {module.weight.shape[0]} rows on this rank, its layout "
                         f"{layout.rows}: the model does not match its config")
    adapt_in_place(module, layout, cfg.dropout)
    return AdaptedTarget(name, target, module, layout, expert_dp_group)


def apply_adapters(model_chunks, cfg: AdapterConfig, tp_group=None, dp_group=None, progress: bool = False,
                   seed: int = 1234, from_checkpoint: bool = False, stats: dict | None = None,
                   base_fingerprint: str | None = None):
    """Adapt and initialise ``cfg.targets`` in this pipeline stage's model chunks.

    Collective over the TP group (and the DP group, which splits the SVD work): every rank
    of the stage must call it. Only this stage's layers are touched. ``base_fingerprint``
    identifies the weights for ``cfg.init_cache`` (without one the cache is not used).
    """
    if isinstance(model_chunks, torch.nn.Module):
        model_chunks = [model_chunks]
    tp_size = tp_group.size() if tp_group is not None else 1
    targets = find_targets(model_chunks, cfg, tp_size)
    initialise_adapters(targets, cfg, tp_group, dp_group, progress, seed, from_checkpoint, stats, base_fingerprint)
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if ".adapters." not in name:
                param.requires_grad_(False)
    return targets


@torch.no_grad()
def initialise_adapters(targets: list[AdaptedTarget], cfg: AdapterConfig, tp_group=None, dp_group=None,
                        progress: bool = False, seed: int = 1234, from_checkpoint: bool = False,
                        stats: dict | None = None, base_fingerprint: str | None = None) -> None:
    """Give each adapted target its method's initial factors (collective, see apply_adapters).
    ``seed``: for methods that draw (LoRA's A), the same at any TP size.

    ``from_checkpoint``: the factors are about to be loaded from a checkpoint, which holds
    A, B and A0, B0: install placeholders of the right shapes and solve nothing (then load
    them with ``checkpoint.adapters.scatter_factors`` and call ``fold_initial``).
    ``stats["eigensolves"]`` counts this rank's eigensolves (and ``cache_hits``/``cache_misses``
    the targets read from and added to ``cfg.init_cache``)."""
    stats = stats if stats is not None else {}
    stats.setdefault("eigensolves", 0)
    # dense targets are split over the TP group and repeated over the data-parallel replicas;
    # experts over their own expert-TP group and repeated over their expert-data-parallel one
    dense = [t for t in targets if not t.is_expert]
    experts = [t for t in targets if t.is_expert]
    groups = [(dense, tp_group, dp_group)]
    if experts:
        groups.append((experts, experts[0].module.tp_group, experts[0].expert_dp_group))
    for part, part_tp, part_dp in groups:
        if part:
            _initialise_group(part, cfg, part_tp, part_dp, progress, seed, from_checkpoint, stats, base_fingerprint)
    if not from_checkpoint:
        fold_initial(targets, cfg)


def _initialise_group(targets: list[AdaptedTarget], cfg: AdapterConfig, tp_group, dp_group, progress: bool, seed: int,
                      from_checkpoint: bool, stats: dict, base_fingerprint: str | None) -> None:
    """``initialise_adapters`` for targets sharded over one TP group (collective over it and
    ``dp_group``)."""
    tp_size = tp_group.size() if tp_group is not None else 1
    tp_rank = tp_group.rank() if tp_group is not None else 0
    variant = get_variant(cfg.method)
    sharded = [ShardedWeight(t.name, t.local_weight(), t.shard_dim) for t in targets]
    for w in sharded:
        check_rank(w, cfg.rank, tp_size)
    if from_checkpoint:
        for t, w in zip(targets, sharded):
            out, inp = w.local.shape
            _install(t, torch.zeros(cfg.rank, inp), torch.zeros(out, cfg.rank), cfg, variant)
        return
    subspaces = [None] * len(targets)
    if variant.subspace is not None and cfg.init_cache and base_fingerprint:
        subspaces = cached_subspaces(cfg.init_cache, base_fingerprint, sharded, cfg.rank, variant.subspace, tp_group,
                                     dp_group, cfg.svd_backend, progress, stats=stats)
    elif variant.subspace is not None:
        subspaces = extract_subspaces(
            sharded, cfg.rank, variant.subspace, tp_group, dp_group, cfg.svd_backend, progress, stats=stats
        )

    for t, w, sub in zip(targets, sharded, subspaces):
        ctx = InitContext(
            name=t.name, shard_dim=t.shard_dim, local_shape=tuple(w.local.shape), full_shape=full_shape(w, tp_size),
            rank=cfg.rank, scaling=cfg.scaling, tp_rank=tp_rank, tp_size=tp_size,
            tp_group=tp_group, seed=seed, subspace=sub,
        )
        factors = variant.init(ctx)
        _install(t, factors.a, factors.b, cfg, variant)


def adapt_linear(module, target: str, cfg: AdapterConfig, tp_group=None, name: str | None = None,
                 seed: int = 1234) -> AdaptedTarget:
    """Adapt one standalone megatron linear as a single (unfused) HF target and initialise it.

    For custom models, tests and benchmarks; GPT models go through ``apply_adapters``.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear

    shard_dim = 0 if isinstance(module, ColumnParallelLinear) else 1
    layout = FusedLayout(1, ((target, module.weight.shape[0]),), shard_dim=shard_dim)
    adapt_in_place(module, layout, cfg.dropout)
    adapted = AdaptedTarget(name or target, target, module, layout)
    initialise_adapters([adapted], cfg, tp_group, seed=seed)
    return adapted


def _install(t: AdaptedTarget, a: torch.Tensor, b: torch.Tensor, cfg: AdapterConfig, variant) -> None:
    """The factors as float32 masters (see TargetAdapter), with what the method declares:
    which of them train, and whether A0/B0 are kept."""
    weight = t.module.weight
    adapter = TargetAdapter(
        a.to(device=weight.device, dtype=torch.float32), b.to(device=weight.device, dtype=torch.float32),
        cfg.scaling, variant.train_a, variant.train_b, initial=variant.subtracts_initial,
        residual_branch=cfg.residual == "branch",
        split_dims=(t.factor_split_dim("lora_A"), t.factor_split_dim("lora_B")),
    )
    if t.is_expert:  # megatron's mark: summed over the expert's own replicas only (train.gradients)
        for param in (adapter.lora_A, adapter.lora_B):
            param.allreduce = False
    t.module.adapters[t.target] = adapter


@torch.no_grad()
def fold_initial(targets: list[AdaptedTarget], cfg: AdapterConfig) -> None:
    """Merge mode: write W - s*B0*A0 into W (float64 arithmetic, the same float32 B0, A0 the
    export later adds back). Branch mode leaves W untouched."""
    if cfg.residual != "merge":
        return
    for t in targets:
        ad = t.adapter
        if ad.lora_A0 is None:
            continue
        weight = t.module.weight
        region = t.layout.view(weight, t.target) if t.shard_dim == 0 else weight
        delta = (cfg.scaling * (ad.lora_B0.double() @ ad.lora_A0.double())).view(region.shape)
        region.copy_((region.to(torch.float64) - delta).to(weight.dtype))
