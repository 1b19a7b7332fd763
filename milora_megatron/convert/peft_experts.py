"""A mixture-of-experts adapter in the two forms its users load.

``fused`` (the default): for PEFT on the ORIGINAL transformers model. transformers 5 holds a
sparse layer's experts as two 3-D parameters, ``mlp.experts.gate_up_proj`` (experts,
2 x ffn, hidden: gate rows, then up rows) and ``mlp.experts.down_proj``; PEFT adapts them
through ``target_parameters``, one LoRA per parameter whose ``lora_A`` (R x experts, in) holds
expert e's rows at ``e * R`` and whose ``lora_B`` (out, R x experts) holds its column k at
``k * experts + e``. Our gate and up adapters of one expert become one rank-2R' LoRA of
gate_up_proj (A's stacked, B's block-diagonal), so that parameter gets its own rank and
alpha (``rank_pattern`` / ``alpha_pattern``, alpha / r unchanged). With both parameters
targeted PEFT nests its wrappers in ``target_parameters`` order: gate_up_proj's factors are
``experts.base_layer.lora_*``, down_proj's ``experts.lora_*``. A dense MLP layer of an MoE
model (Qwen3-MoE's ``mlp_only_layers``) is targeted through ``target_parameters`` too
(``mlp.gate_proj.weight``): PEFT rewrites a ``target_modules`` entry named gate_proj, up_proj
or down_proj of an MoE model into the experts' fused parameters, which would drop it.

``per-expert`` (``--expert-form per-expert``): for serving engines, which read each expert's
adapter under its on-disk name (``mlp.experts.{e}.gate_proj``, Mixtral's
``block_sparse_moe.experts.{e}.w1``) and ignore ``rank_pattern`` / ``alpha_pattern``: every
module has the same rank and alpha, so one scaling is right everywhere.

Each module's factors arrive as ``(A', B')`` in the form the exporter writes for dense
modules (PiSSA/MiLoRA: ``[A; A0]``, ``[B, -B0]``), rank ``rank`` each.
"""

from __future__ import annotations

import re

import torch

from ..mapping.experts import EXPERT_PROJECTIONS, ExpertNames

EXPERT_FORMS = ("fused", "per-expert")
# transformers 5's fused expert parameters (Qwen3-MoE and Mixtral alike), inside a layer
FUSED_EXPERTS = "mlp.experts"
GATE_UP, DOWN = "gate_up_proj", "down_proj"


def _expert_module(module: str, names: ExpertNames) -> tuple[int, int, str] | None:
    """(layer, expert, our projection) of an expert's HF module name, None for any other."""
    m = re.fullmatch(rf"model\.layers\.(\d+)\.{re.escape(names.block)}\.experts\.(\d+)\.(\w+)", module)
    if m is None or names.projection_of(m.group(3)) is None:
        return None
    return int(m.group(1)), int(m.group(2)), names.projection_of(m.group(3))


def fused_form(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float, experts: int,
               ffn: int, names: ExpertNames) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT tensors (without the ``base_model.model.`` prefix) and config fields for
    ``modules`` (HF module -> (A', B')); ``rank``/``alpha`` are every dense module's."""
    tensors, dense_targets, dense_params = {}, set(), set()
    sparse: dict[int, dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for module, (a, b) in modules.items():
        found = _expert_module(module, names)
        if found is not None:
            layer, expert, projection = found
            sparse.setdefault(layer, {}).setdefault(projection, {})[expert] = (a, b)
            continue
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a, b
        leaf = module.rsplit(".", 1)[1]
        if leaf in EXPERT_PROJECTIONS:  # a dense MLP layer of an MoE model: see the module doc
            dense_params.add(f"mlp.{leaf}.weight")
        else:
            dense_targets.add(leaf)
    params, gate_up_rank = set(), 0
    for layer, projections in sorted(sparse.items()):
        # the fused parameters this layer's targets adapt: gate_up_proj for gate/up, down_proj for down
        wanted = ([GATE_UP] if projections.keys() & {"gate_proj", "up_proj"} else []) + \
                 ([DOWN] if "down_proj" in projections else [])
        params.update(wanted)
        nested = len(wanted) == 2
        for param in wanted:
            a, b = (_stack_gate_up(projections, experts, ffn) if param == GATE_UP
                    else _stack(projections["down_proj"], experts))
            if param == GATE_UP:
                gate_up_rank = a.shape[0] // experts
            prefix = f"model.layers.{layer}.{FUSED_EXPERTS}." + ("base_layer." if nested and param == GATE_UP else "")
            tensors[f"{prefix}lora_A.weight"], tensors[f"{prefix}lora_B.weight"] = a, b
    scaling = alpha / rank
    config = {"target_modules": sorted(dense_targets),
              "target_parameters": sorted(dense_params) + [f"{FUSED_EXPERTS}.{p}" for p in (GATE_UP, DOWN)
                                                           if p in params],
              "rank_pattern": {}, "alpha_pattern": {}}
    if gate_up_rank and gate_up_rank != rank:
        config["rank_pattern"][rf".*\.{GATE_UP}"] = gate_up_rank
        config["alpha_pattern"][rf".*\.{GATE_UP}"] = scaling * gate_up_rank
    return tensors, config


def _stack(per_expert: dict[int, tuple[torch.Tensor, torch.Tensor]], experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's fused factors of one 3-D parameter from each expert's (A_e, B_e)."""
    if sorted(per_expert) != list(range(experts)):
        raise ValueError(f"experts {sorted(per_expert)} of {experts}: an expert adapter is missing")
    a = torch.cat([per_expert[e][0] for e in range(experts)])  # expert e's rows at e * R
    b = torch.stack([per_expert[e][1] for e in range(experts)], dim=-1)  # (out, R, experts)
    return a, b.reshape(b.shape[0], -1)  # column k * experts + e


def _stack_gate_up(projections: dict, experts: int, ffn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up_proj's per-expert factors: gate's and up's A stacked, their B block-diagonal
    (gate's into the first ``ffn`` rows, up's into the rest); an untargeted one contributes
    nothing."""
    present = [p for p in ("gate_proj", "up_proj") if p in projections]
    per_expert = {}
    for e in range(experts):
        a_parts, b_cols = [], []
        for p in present:
            a, b = projections[p].get(e, (None, None))
            if a is None:
                raise ValueError(f"expert {e} has no {p} adapter")
            a_parts.append(a)
            col = b.new_zeros(2 * ffn, b.shape[1])
            rows = slice(0, ffn) if p == "gate_proj" else slice(ffn, 2 * ffn)
            col[rows] = b
            b_cols.append(col)
        per_expert[e] = (torch.cat(a_parts), torch.cat(b_cols, dim=1))
    return _stack(per_expert, experts)


def per_expert_form(modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    names: ExpertNames) -> tuple[dict[str, torch.Tensor], dict]:
    """Every module under its own on-disk name, one rank and one alpha for all."""
    tensors, targets = {}, set()
    for module, (a, b) in modules.items():
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a, b
        targets.add(module.rsplit(".", 1)[1])
    return tensors, {"target_modules": sorted(targets), "rank_pattern": {}, "alpha_pattern": {}}
