"""The converted base model: megatron tensor names in megatron's global (TP-invariant) layout,
one safetensors file per transformer layer, plus a manifest.

Why not megatron-core's ``dist_checkpointing``: its save takes the whole state dict in one
call, so a single converter process would hold the whole model (16 GB for Llama-3-8B in
bf16); here each layer is written and released on its own. The layout is the same one
``dist_checkpointing`` stores (qkv grouped, fc1 as [gate; up]), so any rank of any TP/PP
layout reads exactly its slice with ``safe_open(...).get_slice``: the TP/PP given to the
converter are validated defaults, not a property of the files.

The manifest records the HF config, the source folder with the checksum of every source
shard and each tensor's source dtype (so an export returns bit-identical tensors), and the
checksum of every file written here. The fingerprint a training run records (so an export
can tell if the base was replaced) is a hash of the content only (config, tensors and their
files' checksums), not of where or when it was converted: a bit-identical reconversion, or
a moved base, is the same base.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from safetensors import safe_open

from ..errors import CheckpointError, MissingPathError, UserError
from ..mapping.decoder import EMBEDDING, LM_HEAD, layout_of
from ..mapping.experts import expert_of, with_expert
from ..models.decoder import DecoderShape, padded_vocab
from .atomic import PARTIAL_SUFFIX, check_recorded_files, read_json, sha256_file

MANIFEST = "milora_base.json"
FORMAT = "milora-megatron-base"
VERSION = 1
HF_SIDE_DIR = "hf"  # config.json, generation config, tokenizer files copied from the source

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def content_fingerprint(manifest: dict) -> str:
    """The base's identity: its HF config, weight map, source dtypes and every written
    file's checksum, not its paths or conversion time."""
    import hashlib

    content = {"hf_config": manifest["hf_config"], "weight_map": manifest["weight_map"],
               "dtypes": manifest["source"]["dtypes"], "files": {k: v["sha256"] for k, v in manifest["files"].items()}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def layer_file(i: int) -> str:
    return f"layer-{i:05d}.safetensors"


def is_base_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def verify_recorded_files(folder: str, records: dict, checksums: bool, what: str, only=None) -> None:
    """``atomic.check_recorded_files``, raising what it finds as the user errors they are: a
    missing file MissingPathError; a wrong size, a cut-short header or a changed checksum
    CheckpointError (each naming the file)."""
    try:
        check_recorded_files(folder, records, checksums, what, only=only)
    except UserError:
        raise
    except FileNotFoundError as exc:
        raise MissingPathError(str(exc)) from exc
    except ValueError as exc:  # its own findings about the files: size, header, checksum
        raise CheckpointError(str(exc)) from exc


class BaseCheckpoint:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if self.path.endswith(PARTIAL_SUFFIX):
            raise CheckpointError(f"{self.path} is an interrupted conversion (never completed); convert again")
        manifest = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest):
            hint = " (only an interrupted conversion is there)" if os.path.isdir(self.path + PARTIAL_SUFFIX) else ""
            what = "is not a converted base checkpoint" if os.path.isdir(self.path) else "does not exist"
            raise MissingPathError(f"base checkpoint {self.path} {what}{hint}")
        try:
            self.manifest = read_json(manifest)
        except ValueError as exc:  # not JSON
            raise CheckpointError(str(exc)) from exc
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise CheckpointError(f"{manifest} is not a {FORMAT} manifest")
        if self.manifest.get("version") != VERSION:
            raise CheckpointError(f"{manifest} has format version {self.manifest.get('version')}; this code reads {VERSION}")
        self.shape = DecoderShape.from_hf_config(self.manifest["hf_config"])
        self.layouts = self.shape.layer_layouts()
        self.weight_map: dict[str, str] = self.manifest["weight_map"]
        self.fingerprint = content_fingerprint(self.manifest)
        self.legacy_fingerprint = sha256_file(manifest)  # what runs recorded before content fingerprints
        self.check_files(checksums=False)

    @property
    def hf_side_dir(self) -> str:
        return os.path.join(self.path, HF_SIDE_DIR)

    def check_files(self, checksums: bool = False, files=None) -> None:
        """Every file present and complete; with ``checksums`` also bit-identical to when written."""
        verify_recorded_files(self.path, self.manifest["files"], checksums, "base checkpoint", only=files)

    def is_the_base_of(self, recorded_fingerprint: str) -> bool:
        """Whether a run that recorded this fingerprint trained on this base (runs from before
        content fingerprints recorded the manifest's checksum)."""
        return recorded_fingerprint in (self.fingerprint, self.legacy_fingerprint)

    def check_share(self, rank: int, world: int) -> str | None:
        """Verify the checksums of one rank's share of the files (file i on rank i mod world),
        so a distributed run reads the whole checkpoint once; the error, if any."""
        mine = set(sorted(self.manifest["files"])[rank::world])
        try:
            self.check_files(checksums=True, files=mine)
        except (UserError, OSError) as exc:  # damaged, missing or unreadable files
            return str(exc)
        return None

    def tensor(self, name: str) -> torch.Tensor:
        with safe_open(os.path.join(self.path, self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors, keyed by their name inside the layer."""
        prefix = f"decoder.layers.{i}."
        with safe_open(os.path.join(self.path, layer_file(i)), framework="pt") as f:
            return {k[len(prefix):]: f.get_tensor(k) for k in f.keys()}

    def source_dtype(self, hf_name: str) -> torch.dtype:
        return DTYPES[self.manifest["source"]["dtypes"][hf_name]]

    @torch.no_grad()
    def load_into(self, model, tp_rank: int = 0, tp_size: int = 1) -> None:
        """Copy this TP rank's slice of every base parameter of a GPTModel stage (built by
        ``models.decoder.build_gpt``, any TP/PP/EP) from the files. An expert's parameters are
        read for the global expert the module holds, sliced for its expert-TP rank (both
        read off the model's experts modules). Adapter parameters are skipped; a parameter
        the checkpoint lacks is an error."""
        local_to_global = {}
        decoder = getattr(model, "decoder", None)
        for j, layer in enumerate(decoder.layers if decoder is not None else []):
            local_to_global[f"decoder.layers.{j}."] = f"decoder.layers.{layer.layer_number - 1}."
        experts = _expert_placement(model)
        handles = {}
        with contextlib.ExitStack() as open_files:
            for name, param in model.named_parameters():
                if ".adapters." in name:
                    continue
                global_name = self._global_name(name, local_to_global)
                shard, expert = (tp_rank, tp_size), expert_of(name)
                if expert is not None:
                    offset, shard = experts[name.split(".local_experts.")[0]]
                    global_name = with_expert(global_name, offset + expert[0])
                file = self.weight_map.get(global_name)
                if file is None:
                    raise CheckpointError(f"base checkpoint {self.path} has no tensor for parameter {name} ({global_name})")
                if file not in handles:
                    handles[file] = open_files.enter_context(safe_open(os.path.join(self.path, file), framework="pt"))
                param.copy_(self._read_shard(handles[file], global_name, tuple(param.shape), param.dtype, *shard))

    def _global_name(self, name: str, local_to_global: dict[str, str]) -> str:
        if name == LM_HEAD[1] and self.shape.tied:
            return EMBEDDING[1]  # the last stage's copy of a tied embedding (PP > 1)
        for local, glob in local_to_global.items():
            if name.startswith(local):
                return glob + name[len(local):]
        return name

    def _read_shard(self, handle, name: str, local_shape, dtype, tp_rank: int, tp_size: int) -> torch.Tensor:
        sliced = handle.get_slice(name)
        if name in (EMBEDDING[1], LM_HEAD[1]):
            rows = padded_vocab(self.shape.vocab, tp_size) // tp_size
            start, stop = tp_rank * rows, min((tp_rank + 1) * rows, self.shape.vocab)
            out = torch.zeros(local_shape, dtype=dtype)  # padded rows stay zero
            if stop > start:
                out[: stop - start] = sliced[start:stop]
            return out
        found = expert_of(name)
        if found is not None:
            layer = int(name.split(".")[2])
            layout = self.shape.sparse(layer).layouts()[found[1]]
        else:
            layout = layout_of(name, self.layouts)
        shape = tuple(sliced.get_shape())
        index = [(slice(None),)] if layout is None else layout.shard_index(shape, tp_size, tp_rank)  # norms: whole
        parts = [sliced[idx] for idx in index]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if tuple(out.shape) != local_shape:
            raise CheckpointError(f"{self.path}: {name}: checkpoint slice {tuple(out.shape)} does not match the "
                                  f"model's {local_shape}")
        return out


def _expert_placement(model) -> dict[str, tuple[int, tuple[int, int]]]:
    """For each experts module of a model stage (megatron's ``SequentialMLP``, by its
    parameter-name prefix): the global index of its first local expert, and its
    expert-tensor-parallel (rank, size)."""
    out = {}
    for prefix, module in model.named_modules():
        if hasattr(module, "local_experts") and hasattr(module, "ep_group"):
            ep_rank = module.ep_group.rank() if module.ep_group is not None else 0
            etp = module.tp_group
            out[prefix] = (ep_rank * module.num_local_experts,
                                (etp.rank(), etp.size()) if etp is not None else (0, 1))
    return out
