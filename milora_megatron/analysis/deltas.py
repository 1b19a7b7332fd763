"""Where dW comes from, one (layer, target) at a time: a PEFT LoRA adapter folder (dW = s B A,
analysed through its factors) or a merged HF folder (dW = merged - base, in float64), always
against the ORIGINAL base HF folder; and the per-layer spectrum report built from them.

Only Hugging Face formats are read, so adapters trained elsewhere work too. Nothing holds
more than one weight matrix of the model (plus the small adapter) at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..convert.hf_folder import HFFolder, checked_header
from ..errors import CheckpointError, ConfigError, MissingPathError
from ..mapping import HF_TARGETS, PROJECTIONS
from .provenance import check_base, export_info
from .spectrum import SVD, analyze_pair, init_side, lowrank_svd64, matched_init, svd64
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
                  r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def weight_name(layer: int, target: str) -> str:
    return f"{PROJECTIONS[target].hf_module(layer)}.weight"


@dataclass
class Factored:
    """dW = scale * b @ a; for our PiSSA/MiLoRA exports the last ``initial_cols`` columns of b
    (and rows of a) are the initial update, stored as [-B0] and [A0]."""

    b: torch.Tensor
    a: torch.Tensor
    scale: float
    initial_cols: int = 0

    def svd(self) -> SVD:
        return lowrank_svd64(self.b, self.a, self.scale)

    def initial_svd(self) -> SVD | None:
        k = self.initial_cols
        return lowrank_svd64(self.b[:, -k:], self.a[-k:], self.scale) if k else None


class PeftAdapter:
    """A PEFT LoRA folder: adapter_config.json + adapter_model.safetensors (+ our milora_export.json)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        cfg_path = os.path.join(self.path, "adapter_config.json")
        self.file = os.path.join(self.path, "adapter_model.safetensors")
        if os.path.isfile(self.path):
            raise CheckpointError(f"{self.path} is a file, not a PEFT adapter folder (give the folder that holds "
                                  "adapter_config.json)")
        if not os.path.isdir(self.path):
            raise MissingPathError(f"adapter folder {self.path} does not exist")
        for f in (cfg_path, self.file):
            if not os.path.isfile(f):
                raise MissingPathError(f"{self.path} is not a PEFT adapter folder: {os.path.basename(f)} is missing")
        with open(cfg_path) as f:
            try:
                self.config = json.load(f)
            except ValueError as exc:
                raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg_path} is not a JSON object")
        if self.config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{self.path}: peft_type {self.config['peft_type']!r}, only LORA adapters are supported")
        if self.config.get("use_dora"):
            raise CheckpointError(f"{self.path}: DoRA adapters are not supported (their update is not s B A)")
        for key in ("r", "lora_alpha"):
            value = self.config.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise CheckpointError(f"{cfg_path}: {key} is {value!r}, not a positive number")
        self.export_info = export_info(self.path)
        self.keys: dict[tuple[int, str], dict[str, str]] = {}
        for key in checked_header(self.file):  # (a cut-short file refused here, naming it)
            m = _KEY.match(key)
            if m and m.group(2) in PROJECTIONS:
                self.keys.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = key
        incomplete = [k for k, v in self.keys.items() if len(v) != 2]
        if incomplete:
            raise CheckpointError(f"{self.file}: lora_A or lora_B missing for (layer, target) {incomplete[:4]}")

    @property
    def method(self) -> str | None:
        return self.export_info.get("method") if self.export_info else None

    @property
    def trained_rank(self) -> int:
        return int(self.export_info["trained_rank"]) if self.export_info else int(self.config["r"])

    def _alpha(self, layer: int, target: str) -> float:
        """PEFT's per-module alpha: an ``alpha_pattern`` key matching the module name's tail."""
        module = weight_name(layer, target)[: -len(".weight")]
        for key, value in (self.config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return float(value)
        return float(self.config["lora_alpha"])

    def has(self, layer: int, target: str) -> bool:
        return (layer, target) in self.keys

    def delta(self, layer: int, target: str, base_weight: torch.Tensor) -> Factored:
        """dW as its factors (``base_weight`` is not needed: the update is s B A)."""
        keys = self.keys[(layer, target)]
        with safe_open(self.file, framework="pt") as f:
            a, b = f.get_tensor(keys["A"]).to(torch.float64), f.get_tensor(keys["B"]).to(torch.float64)
        r = a.shape[0]
        alpha = self._alpha(layer, target)
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        two_r = self.export_info is not None and self.export_info.get("form", "").startswith("rank-2r")
        return Factored(b, a, scale, initial_cols=r // 2 if two_r else 0)


class MergedModel:
    """A merged HF folder: dW = merged - base, per tensor, in float64."""

    def __init__(self, path: str):
        self.folder = HFFolder(path)

    def has(self, layer: int, target: str) -> bool:
        return weight_name(layer, target) in self.folder.weight_map

    def delta(self, layer: int, target: str, base_weight: torch.Tensor) -> torch.Tensor:
        """merged - base in float64 (``base_weight``: the base tensor, already read by the caller)."""
        name = weight_name(layer, target)
        merged = self.folder.tensor(name)
        if merged.shape != base_weight.shape:
            raise CheckpointError(f"{name}: merged shape {tuple(merged.shape)} != base shape {tuple(base_weight.shape)}")
        return merged.to(torch.float64) - base_weight.to(torch.float64)


def parse_layers(spec: str | None, num_layers: int) -> list[int] | None:
    """'0,3,8-11' -> [0, 3, 8, 9, 10, 11]; None/'' -> None (all)."""
    if not spec:
        return None
    out = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ConfigError(f"layer range {part!r} is not a layer or a range such as 8-11") from None
        if not 0 <= first <= last < num_layers:
            raise ConfigError(f"layer range {part!r} is outside 0..{num_layers - 1}")
        out += range(first, last + 1)
    return sorted(set(out))


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


SUMMARY_KEYS = ("amplification", "amplification_projected", "left_top", "left_bottom", "right_top", "right_bottom")


def _flat(entry: dict) -> dict:
    sim = entry.get("similarity") or {}
    return {k: entry.get(k, sim.get(k)) for k in SUMMARY_KEYS}


def summarise(entries: list[dict]) -> dict:
    """Means over layers per target, over targets per layer, and over everything."""

    def means(group):
        flats = [_flat(e) for e in group]
        return {k: _mean(f[k] for f in flats) for k in SUMMARY_KEYS}

    targets = sorted({e["target"] for e in entries}, key=HF_TARGETS.index)
    layers = sorted({e["layer"] for e in entries})
    return {
        "all": means(entries),
        "by_target": {t: means([e for e in entries if e["target"] == t]) for t in targets},
        "by_layer": {str(i): means([e for e in entries if e["layer"] == i]) for i in layers},
    }


def spectrum_report(base_dir: str, adapter_dir: str | None = None, merged_dir: str | None = None,
                    rank: int | None = None, method: str | None = None, targets: list[str] | None = None,
                    layers: list[int] | None = None, progress: bool = True) -> dict:
    """Per (layer, target): amplification factor, subspace similarity of dW to W's top-r and
    bottom-r singular subspaces, W's spectrum and the part of it the method's init came from.

    Exactly one of ``adapter_dir`` (PEFT LoRA folder) and ``merged_dir`` (merged HF folder).
    ``rank`` defaults to the trained rank of our exports (milora_export.json), else the
    adapter's r; a merged folder needs it. ``method`` defaults to milora_export.json's.
    Targets/layers whose dW is exactly zero (or absent) are listed under "unchanged".
    """
    from tqdm import tqdm

    if (adapter_dir is None) == (merged_dir is None):
        raise ValueError("give exactly one of adapter_dir and merged_dir")
    base = HFFolder(base_dir)
    unchecked = check_base(base_dir, adapter_dir or merged_dir)
    num_layers = base.num_layers()
    if adapter_dir is not None:
        source = PeftAdapter(adapter_dir)
        method_source = "argument" if method else ("milora_export.json" if source.method else "unknown")
        method = method or source.method
        rank_source = "argument" if rank else ("milora_export.json" if source.export_info else "adapter_config.json")
        rank = rank or source.trained_rank
        default_targets = sorted({t for _, t in source.keys}, key=HF_TARGETS.index)
        default_layers = sorted({i for i, _ in source.keys})
    else:
        if not rank:
            raise ConfigError("a merged folder does not record the adapter's rank: give rank (--rank)")
        source = MergedModel(merged_dir)
        method_source, rank_source = ("argument" if method else "unknown"), "argument"
        default_targets, default_layers = list(HF_TARGETS), list(range(num_layers))
    init_side(method)  # an unknown method fails here, listing the known ones
    targets = list(targets or default_targets)
    bad = [t for t in targets if t not in HF_TARGETS]
    if bad:
        raise ConfigError(f"unknown target(s) {bad}; known: {list(HF_TARGETS)}")
    layers = list(layers if layers is not None else default_layers)
    bad_layers = [i for i in layers if not 0 <= i < num_layers]
    if bad_layers:
        raise ConfigError(f"layer(s) {bad_layers} outside 0..{num_layers - 1}")

    entries, unchanged = [], []
    for layer in tqdm(layers, desc="spectrum", unit="layer", disable=not progress, file=sys.stderr):
        for target in targets:
            if not source.has(layer, target):
                unchanged.append(f"{layer}.{target}")
                continue
            w = base.tensor(weight_name(layer, target)).to(torch.float64)  # read once per target
            delta = source.delta(layer, target, w)
            if isinstance(delta, torch.Tensor) and not bool(delta.any()):
                delta = None  # untouched by the merge: skip its SVD
            dw_svd = None if delta is None else delta.svd() if isinstance(delta, Factored) else svd64(delta)
            if dw_svd is None or not bool((dw_svd.s > 0).any()):
                unchanged.append(f"{layer}.{target}")
                continue
            if dw_svd.u.shape[0] != w.shape[0] or dw_svd.v.shape[0] != w.shape[1]:
                raise CheckpointError(f"{weight_name(layer, target)}: update is {dw_svd.u.shape[0]} x "
                                      f"{dw_svd.v.shape[0]}, base weight {tuple(w.shape)}: adapter and base do not match")
            w_svd = svd64(w)
            entry = {"layer": layer, "target": target}
            entry.update(analyze_pair(w, dw_svd, rank, method, w_svd=w_svd, seed=layer * 100 + HF_TARGETS.index(target)))
            if isinstance(delta, Factored) and delta.initial_cols:
                init = delta.initial_svd()
                entry["init_update_sigma"] = init.s[:rank].tolist()
                entry["init_update_rel_err"] = matched_init(init.s, w_svd.s, rank)
            entries.append(entry)
            del w, w_svd, dw_svd, delta
    return {
        "base": os.path.abspath(base_dir),
        "adapter": os.path.abspath(adapter_dir) if adapter_dir else None,
        "merged": os.path.abspath(merged_dir) if merged_dir else None,
        # whether --base was checked against the base the export records (None: it records none)
        "base_check": {"verified": unchecked is None, "note": unchecked},
        "method": method, "method_source": method_source,
        "init_subspace": init_side(method),
        "rank": rank, "rank_source": rank_source,
        "targets": targets, "layers": layers,
        "entries": entries, "unchanged": unchanged,
        "summary": summarise(entries),
    }
