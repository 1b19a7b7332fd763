"""Base checkpoint (+ a run's adapter) -> Hugging Face: a merged model or a PEFT adapter.

The merged weights are computed from the ORIGINAL base tensors, in float32,
``W + s (B A - B0 A0)``, then cast to each tensor's source dtype (or ``dtype``): a residual
stored in bf16 during training never reaches the export.

What the user can act on arrives as a ``UserError`` (``errors.py``): a damaged, diverged or
ambiguous checkpoint, an output that exists or cannot be written, a full disk. The output is
written atomically: a failed export leaves nothing behind and an earlier export it was to
replace (``overwrite``) untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..checkpoint.adapters import CHECKPOINTS, AdapterCheckpoint, candidates, diverged
from ..checkpoint.atomic import atomic_directory, check_output
from ..checkpoint.base import DTYPES, MANIFEST, BaseCheckpoint, is_base_checkpoint
from ..errors import CheckpointError, ConfigError
from .hf_folder import INDEX_NAME
from .peft_experts import EXPERT_FORMS, fused_form, per_expert_form
from ..mapping.decoder import EMBEDDING, FINAL_NORM, LM_HEAD, hf_layer_prefix, megatron_to_hf_layer


# what a training run writes at the top of its output folder
RUN_MARKERS = ("run.json", "config.json", "metrics.jsonl")


def _run_inside(path: str) -> list[str]:
    """What of a training run a folder holds (``checkpoints/``, a run's run.json, ...)."""
    held = []
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        steps = [os.path.basename(p) for p in candidates(path)]
        held.append(f"{CHECKPOINTS}/ ({', '.join(steps[:3])}{', ...' if len(steps) > 3 else ''})" if steps
                    else f"{CHECKPOINTS}/")
    for name in RUN_MARKERS:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if name == "config.json":  # a training config, not some model's config.json
            try:
                with open(full) as f:
                    config = json.load(f)
            except (OSError, ValueError):
                continue
            if not (isinstance(config, dict) and "peft" in config and "train" in config):
                continue
        held.append(name)
    return held


def open_checkpoint(path: str, verify: bool = True, base_path: str | None = None
                    ) -> tuple[BaseCheckpoint, AdapterCheckpoint | None]:
    """``path``: a converted base checkpoint (or its manifest file, to name the base alone), an
    adapter checkpoint, or a run folder (its latest). A base checkpoint that also holds a
    training run is refused: which of the two to export is the user's to say.

    The adapter's checksums are always verified (its files are small, and a flipped byte
    would be exported as a huge entry); ``verify=False`` skips only the base's."""
    if os.path.basename(os.path.normpath(path)) == MANIFEST and os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))  # the base, explicitly
    elif is_base_checkpoint(path):
        held = _run_inside(path)
        if held:
            folder = os.path.abspath(path)
            steps = candidates(folder)
            step = steps[0] if steps else os.path.join(folder, CHECKPOINTS, "step_N")
            raise CheckpointError(
                f"{folder} is a base checkpoint and also holds a training run ({'; '.join(held)}): refusing to guess "
                f"which to export; give the step folder (e.g. {step}) for the run's adapter, or "
                f"{os.path.join(folder, MANIFEST)} for the base alone")
    if is_base_checkpoint(path):
        base = BaseCheckpoint(path)
        if verify:
            base.check_files(checksums=True)
        return base, None
    adapter = AdapterCheckpoint(path, verify=True)
    bad = diverged(adapter.tensors())
    if bad:
        raise CheckpointError(f"refusing to export {adapter.path}: its factors diverged ({'; '.join(bad[:3])}); "
                              "export an earlier checkpoint (give its step folder)")
    return adapter.open_base(verify=verify, path=base_path), adapter


class _ShardWriter:
    """HF-style sharded safetensors: a shard is flushed once it reaches ``max_bytes``."""

    def __init__(self, folder: str, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, os.path.join(self.folder, f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(os.path.join(self.folder, "shard-00000.tmp"), os.path.join(self.folder, "model.safetensors"))
            return
        weight_map = {}
        for k, names in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.folder, f"shard-{k:05d}.tmp"), os.path.join(self.folder, final))
            weight_map.update({name: final for name in names})
        with open(os.path.join(self.folder, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)


def _merged(module: str, w: torch.Tensor, factors: dict[str, torch.Tensor], s: float) -> torch.Tensor:
    """W + s (B A - B0 A0), accumulated in float32 into one fp32 copy of W."""
    if f"{module}.lora_A" not in factors:
        return w
    w = w.float()
    w.addmm_(factors[f"{module}.lora_B"].float(), factors[f"{module}.lora_A"].float(), alpha=s)
    if f"{module}.lora_A0" in factors:
        w.addmm_(factors[f"{module}.lora_B0"].float(), factors[f"{module}.lora_A0"].float(), alpha=-s)
    return w


def export_merged(path: str, out: str, dtype: str | None = None, max_shard_bytes: int = 10**9,
                  overwrite: bool = False, verify: bool = True, progress: bool = True, base_path: str | None = None) -> str:
    check_output(out, overwrite)  # before any checksum of a 16 GB base
    base, adapter = open_checkpoint(path, verify, base_path)
    shape = base.shape
    cast = DTYPES[dtype] if dtype else None
    scaling = adapter.scaling if adapter is not None else 1.0

    with atomic_directory(out, overwrite=overwrite) as tmp:  # a full disk: DiskFullError
        writer = _ShardWriter(tmp, max_shard_bytes)

        def emit(hf_name: str, tensor: torch.Tensor) -> None:
            writer.add(hf_name, tensor.to(cast or base.source_dtype(hf_name)))

        bar = tqdm(total=shape.layers + 2, desc="export merged" if adapter else "export", unit="part",
                   disable=not progress)
        emit(EMBEDDING[0], base.tensor(EMBEDDING[1]))
        bar.update()
        for i in range(shape.layers):
            hf = megatron_to_hf_layer(base.layer_tensors(i), shape.layer_layouts(i), shape.norms, shape.sparse(i))
            factors = adapter.tensors(prefix=hf_layer_prefix(i)) if adapter is not None else {}
            for name in list(hf):  # pop: each tensor is released once written
                full = hf_layer_prefix(i) + name
                emit(full, _merged(full[: -len(".weight")], hf.pop(name), factors, scaling))
            bar.update()
        emit(FINAL_NORM[0], base.tensor(FINAL_NORM[1]))
        if not shape.tied:
            emit(LM_HEAD[0], base.tensor(LM_HEAD[1]))
        bar.update()
        bar.close()
        writer.close()
        _copy_side_files(base, tmp, dtype)
        with open(os.path.join(tmp, "milora_export.json"), "w") as f:
            json.dump(_provenance(base, adapter), f, indent=2)
    return os.path.abspath(out)


def _provenance(base: BaseCheckpoint, adapter: AdapterCheckpoint | None) -> dict:
    """What an export came from, for milora_export.json (analysis/provenance.py checks a
    --base against ``base_shards``)."""
    info = {"base_checkpoint": base.path, "base_shards": base.manifest["source"]["shards"]}
    if adapter is not None:
        info.update(adapter_checkpoint=adapter.path, step=adapter.meta["step"], method=adapter.peft["method"])
    return info


def _copy_side_files(base: BaseCheckpoint, folder: str, dtype: str | None) -> None:
    for name in os.listdir(base.hf_side_dir):
        shutil.copy2(os.path.join(base.hf_side_dir, name), folder)
    if dtype:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        name = str(DTYPES[dtype]).replace("torch.", "")
        config["torch_dtype"] = config["dtype"] = name
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)


def _target_modules(targets, wrapper: dict | None):
    """PEFT's ``target_modules``: the projection names, or, for a multimodal original, a
    pattern that matches its text decoder's projections only (a vision tower has q_proj too)."""
    if not wrapper:
        return list(targets)
    return re.escape(wrapper["module_prefix"]) + r"layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + ")"


def export_peft(path: str, out: str, dtype: str | None = None, overwrite: bool = False, verify: bool = True,
                base_path: str | None = None, expert_form: str = "fused") -> str:
    """A PEFT LoRA folder that applies to the ORIGINAL base model.

    PiSSA/MiLoRA trained from W - s B0 A0; on the original W their update is
    s (B A - B0 A0), which is a rank-2r LoRA ``[B, -B0] [A; A0]`` with alpha doubled so
    that alpha / r stays s (the form PEFT's own PiSSA conversion writes). A mixture-of-
    experts model's adapter is written in ``expert_form`` (convert/peft_experts.py): ``fused``
    for PEFT on transformers' fused experts, ``per-expert`` for serving engines.
    """
    if expert_form not in EXPERT_FORMS:
        raise ConfigError(f"expert_form must be one of {list(EXPERT_FORMS)}, got {expert_form!r}")
    check_output(out, overwrite)  # before any checksum of a 16 GB base
    base, adapter = open_checkpoint(path, verify, base_path)
    if adapter is None:
        raise ConfigError(f"{path} is a base checkpoint: there is no adapter to export (drop --adapter-only)")
    factors = adapter.tensors()
    peft = adapter.peft
    cast = DTYPES[dtype] if dtype else torch.float32
    has_initial = any(k.endswith(".lora_A0") for k in factors)
    rank, alpha = peft["rank"], float(peft["alpha"])
    if has_initial:
        rank, alpha = 2 * rank, 2 * alpha
    modules = {}
    for key in sorted(k for k in factors if k.endswith(".lora_A")):
        module = key[: -len(".lora_A")]
        a, b = factors[f"{module}.lora_A"], factors[f"{module}.lora_B"]
        if has_initial:
            a = torch.cat([a, factors[f"{module}.lora_A0"]], dim=0)
            b = torch.cat([b, -factors[f"{module}.lora_B0"]], dim=1)
        modules[module] = (a.to(cast).contiguous(), b.to(cast).contiguous())
    # a multimodal source (models/families: Wrapper): the adapter is for that original model,
    # whose text decoder's modules sit under the wrapper's prefix
    wrapper = base.manifest["source"].get("wrapper")
    shape = base.shape
    if shape.experts and expert_form == "fused":
        tensors, fields = fused_form(modules, rank, alpha, shape.experts, shape.moe_ffn, shape.expert_names)
    elif shape.experts:
        tensors, fields = per_expert_form(modules, shape.expert_names)
    else:
        tensors = {}
        for module, (a, b) in modules.items():
            name = wrapper["module_prefix"] + module.removeprefix("model.") if wrapper else module
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
        fields = {"target_modules": _target_modules(peft["targets"], wrapper), "rank_pattern": {}, "alpha_pattern": {}}
    tensors = {f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()}
    # PEFT's LoRA on fused expert parameters refuses dropout; the export is for inference
    dropout = 0.0 if shape.experts else peft["dropout"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base.manifest["source"]["hf_dir"],
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, **fields,
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:  # a full disk: DiskFullError
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "milora_export.json"), "w") as f:
            json.dump({"method": peft["method"], "trained_rank": peft["rank"], "trained_alpha": float(peft["alpha"]),
                       "form": "rank-2r [B, -B0][A; A0]" if has_initial else "rank-r",
                       **({"expert_form": expert_form} if shape.experts else {}),
                       **_provenance(base, adapter)}, f, indent=2)
    return os.path.abspath(out)
