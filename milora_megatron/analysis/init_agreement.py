"""Our SVD initialisations against PEFT's own, each measured against a float64 SVD of the
same weight, so a table shows whose error is whose.

PEFT initialises PiSSA and MiCA with a float32 ``torch.linalg.svd`` on one process; we
solve in float64 (distributed Gram + Rayleigh-Ritz) and keep the factors as float32 masters.
Per target: the largest principal angle (its sine) between the factors' subspace and the
reference singular vectors (left from B, right from A), the singular values the factors
carry (PiSSA: s |B_i| |A_i|), and for PiSSA the residual W - s B A against
W - U_r S_r V_r^T. The minor end (MiCA) is where float32 SVD loses digits.
"""

from __future__ import annotations

import torch

PEFT_INIT = {"pissa": "pissa", "mica": "mica"}  # our method -> PEFT's init_lora_weights


def sin_largest_angle(basis: torch.Tensor, reference: torch.Tensor) -> float:
    """sin of the largest principal angle between span(basis) and span(reference) (columns)."""
    q, _ = torch.linalg.qr(basis.double())
    ref, _ = torch.linalg.qr(reference.double())
    cosines = torch.linalg.svdvals(ref.t() @ q).clamp(max=1.0)
    return float(torch.sqrt(1.0 - cosines.min() ** 2))


def reference_svd(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(W, U, S, V^T) in float64: computed once per weight, shared by every init measured."""
    w = weight.double()
    return (w, *torch.linalg.svd(w, full_matrices=False))


def measure(ref: tuple[torch.Tensor, ...], a: torch.Tensor, b: torch.Tensor, method: str, rank: int, scaling: float,
            residual: torch.Tensor | None = None) -> dict:
    """Errors of one target's initial factors (and, for PiSSA, the residual weight the
    method trains from; default W - s B A in float64) against ``reference_svd(W)``."""
    w, u, s, vh = ref
    pick = slice(0, rank) if method == "pissa" else slice(s.numel() - rank, s.numel())
    out = {"left_sin": sin_largest_angle(b, u[:, pick])}
    if method == "pissa":
        out["right_sin"] = sin_largest_angle(a.t(), vh[pick].t())
        carried = scaling * b.double().norm(dim=0) * a.double().norm(dim=1)
        out["sigma_rel"] = float(((carried - s[pick]).abs() / s[pick]).max())
        want = w - (u[:, pick] * s[pick]) @ vh[pick]
        got = (w - scaling * (b.double() @ a.double())) if residual is None else residual.double()
        out["residual_rel"] = float((got - want).norm() / want.norm())
    out["sigma_min_ref"] = float(s[pick].min())
    return out


def peft_initial_factors(hf_dir: str, method: str, rank: int, alpha: float, targets: list[str]) -> dict:
    """PEFT's own initialisation of ``targets`` on the HF model (float32): per HF module
    name, its lora_A, lora_B and the base weight PEFT leaves (PiSSA subtracts its part)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                            init_lora_weights=PEFT_INIT[method]))
    out = {}
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = {"lora_A": module.lora_A["default"].weight.detach().clone(),
                        "lora_B": module.lora_B["default"].weight.detach().clone(),
                        "residual": module.get_base_layer().weight.detach().clone()}
    return out


def agreement(refs: dict[str, tuple], ours: dict, peft: dict, method: str, rank: int,
              scaling: float) -> dict[str, dict[str, dict[str, float]]]:
    """{"ours"|"peft": {metric: worst over the targets}} from each module's
    ``reference_svd(W)`` and per-module factors (``ours[module]`` = {"lora_A", "lora_B"} as our checkpoints store them, A0/B0 for
    PiSSA's initial factors; ``peft[module]`` from ``peft_initial_factors``)."""
    worst = {"ours": {}, "peft": {}}
    for module, ref in refs.items():
        rows = {"ours": measure(ref, ours[module]["lora_A"], ours[module]["lora_B"], method, rank, scaling),
                "peft": measure(ref, peft[module]["lora_A"], peft[module]["lora_B"], method, rank, scaling,
                                residual=peft[module]["residual"] if method == "pissa" else None)}
        for who, row in rows.items():
            for k, v in row.items():
                if k == "sigma_min_ref":
                    worst[who][k] = min(worst[who].get(k, v), v)
                else:
                    worst[who][k] = max(worst[who].get(k, 0.0), v)
    return worst


def our_initial_factors(base_path: str, method: str, rank: int, alpha: float, targets: list[str]) -> dict:
    """Our initialisation of ``targets`` on a converted base checkpoint, at TP=1 in this
    process (megatron's parallel state must be set up, one rank): per HF module name, the
    float32 lora_A / lora_B as a checkpoint stores them (PiSSA's initial A0/B0 equal them)."""
    from ..adapters import AdapterConfig
    from ..adapters.apply import apply_adapters
    from ..checkpoint.adapters import gather_factors
    from ..checkpoint.base import BaseCheckpoint
    from ..models.decoder import build_gpt, transformer_config

    base = BaseCheckpoint(base_path)
    model = build_gpt(base.shape, transformer_config(base.shape, perform_initialization=False))
    base.load_into(model)
    found = apply_adapters(model, AdapterConfig(method=method, rank=rank, alpha=alpha, dropout=0.0, targets=targets))
    factors = gather_factors(found)
    return {t.name: {"lora_A": factors[f"{t.name}.lora_A"], "lora_B": factors[f"{t.name}.lora_B"]} for t in found}
