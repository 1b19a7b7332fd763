"""A Hugging Face model folder on local disk, read one tensor at a time.

Every shard is checked before anything is converted (present, header readable, as long as
its header says), so a bad folder fails fast with the file's name. Tensors are read through
a short-lived ``safe_open`` so no shard stays mapped: resident memory stays near one tensor.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from ..checkpoint.atomic import safetensors_header
from ..errors import CheckpointError, MissingPathError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
INDEX_NAME = "model.safetensors.index.json"
# Tensors some HF Llama checkpoints carry that are derived, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _json_of(f, path: str):
    try:
        return json.load(f)
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None


def _read_json(path: str):
    with open(path) as f:
        return _json_of(f, path)


def checked_header(path: str) -> dict:
    """A safetensors file's header; a cut-short or corrupt one is a damaged checkpoint."""
    try:
        return safetensors_header(path)
    except ValueError as exc:  # (all its own refusals name the file)
        raise CheckpointError(str(exc)) from None
    except (KeyError, TypeError, AttributeError):  # valid JSON, but not a header's shape
        raise CheckpointError(f"corrupt safetensors header in {path}") from None


def check_model_folder(path: str, what: str = "HF model folder") -> str:
    """``path`` as an absolute folder that holds a config.json, or a one-line refusal saying
    what it is instead (missing, a file, a folder without a config)."""
    full = os.path.abspath(path)
    if os.path.isfile(full):
        hint = (" (a GGUF file becomes an HF folder through milora_megatron.convert.gguf.gguf_to_hf)"
                if full.endswith(".gguf") else "")
        raise CheckpointError(f"{full} is a file, not an {what} (give the folder that holds config.json){hint}")
    if not os.path.isdir(full):
        raise MissingPathError(f"{what} {full} does not exist")
    if not os.path.isfile(os.path.join(full, "config.json")):
        raise MissingPathError(f"{full} has no config.json")
    return full


class HFFolder:
    def __init__(self, path: str):
        self.path = check_model_folder(path)
        self.config = _read_json(os.path.join(self.path, "config.json"))
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{os.path.join(self.path, 'config.json')} is not a JSON object")
        self.weight_map = self._weight_map()
        self.headers = {}
        for shard in sorted(set(self.weight_map.values())):
            full = os.path.join(self.path, shard)
            if not os.path.isfile(full):
                raise MissingPathError(f"missing shard {shard} (listed in {INDEX_NAME}) in {self.path}")
            self.headers[shard] = checked_header(full)
        for name, shard in self.weight_map.items():
            if name not in self.headers[shard]:
                raise CheckpointError(f"{shard} does not contain {name}, which {INDEX_NAME} places there")
        self.disk_names = {name: name for name in self.weight_map}  # our name -> the file's
        self.wrapper, self.left_out = None, []
        self._read_text_model_only()

    def _read_text_model_only(self) -> None:
        """A multimodal checkpoint whose text decoder a family reads (models/families:
        ``Wrapper``): from here on the folder is that text model; the rest is ``left_out``."""
        from ..models.families import text_config, wrapper_for

        found = wrapper_for(self.config)
        if found is None:
            return
        family, self.wrapper = found
        self.config = text_config(self.config, family, self.wrapper)
        renamed = {}
        for name in self.weight_map:
            prefix = next((p for p in self.wrapper.weight_prefixes if name.startswith(p)), None)
            if prefix is None:
                self.left_out.append(name)
            else:
                renamed[self.wrapper.weight_prefixes[prefix] + name[len(prefix):]] = name
        self.weight_map = {ours: self.weight_map[disk] for ours, disk in renamed.items()}
        self.disk_names = renamed

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.isfile(index):
            weight_map = _read_json(index)
            if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
                raise CheckpointError(f"{index} has no \"weight_map\" (not a safetensors index)")
            weight_map = weight_map["weight_map"]
        elif os.path.isfile(os.path.join(self.path, "model.safetensors")):
            header = checked_header(os.path.join(self.path, "model.safetensors"))
            weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
        else:
            others = [f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {others}: convert them to safetensors first)" if others else ""
            raise MissingPathError(f"no model.safetensors or {INDEX_NAME} in {self.path}{hint}")
        return {k: v for k, v in weight_map.items() if not k.endswith(IGNORED_SUFFIXES)}

    def num_layers(self) -> int:
        """``num_hidden_layers`` of the config (a config without it is not a decoder's)."""
        layers = self.config.get("num_hidden_layers")
        if not isinstance(layers, int) or layers < 1:
            raise CheckpointError(f"{os.path.join(self.path, 'config.json')}: num_hidden_layers is {layers!r}, "
                                  "not a positive number of layers")
        return layers

    def names(self) -> list[str]:
        return list(self.weight_map)

    def dtype_of(self, name: str) -> str:
        code = self.headers[self.weight_map[name]][self.disk_names[name]]["dtype"]
        return {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}.get(code, code)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.weight_map[name]][self.disk_names[name]]["shape"])

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path} has no tensor {name}")
        with safe_open(os.path.join(self.path, self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(self.disk_names[name])

    def shard_files(self) -> list[str]:
        """Every shard the folder's index names (a wrapper's left-out tensors' shards included)."""
        return sorted(set(self.headers))

    def side_files(self) -> list[str]:
        """Config, generation config, tokenizer files...: everything but weights and subfolders."""
        out = []
        for name in sorted(os.listdir(self.path)):
            full = os.path.join(self.path, name)
            if os.path.isfile(full) and not name.endswith(WEIGHT_SUFFIXES) and name != INDEX_NAME:
                out.append(name)
        return out
