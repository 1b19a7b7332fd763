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

from ..checkpoint.atomic import read_json, safetensors_header

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
INDEX_NAME = "model.safetensors.index.json"
# Tensors some HF Llama checkpoints carry that are derived, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _json_of(f, path: str):
    try:
        return json.load(f)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


class HFFolder:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"HF model folder {self.path} does not exist")
        config_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{self.path} has no config.json")
        self.config = read_json(config_path)
        self.weight_map = self._weight_map()
        self.headers = {}
        for shard in sorted(set(self.weight_map.values())):
            full = os.path.join(self.path, shard)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"missing shard {shard} (listed in {INDEX_NAME}) in {self.path}")
            self.headers[shard] = safetensors_header(full)
        for name, shard in self.weight_map.items():
            if name not in self.headers[shard]:
                raise ValueError(f"{shard} does not contain {name}, which {INDEX_NAME} places there")

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = _json_of(f, os.path.join(self.path, INDEX_NAME))["weight_map"]
        elif os.path.isfile(os.path.join(self.path, "model.safetensors")):
            header = safetensors_header(os.path.join(self.path, "model.safetensors"))
            weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
        else:
            others = [f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {others}: convert them to safetensors first)" if others else ""
            raise FileNotFoundError(f"no model.safetensors or {INDEX_NAME} in {self.path}{hint}")
        return {k: v for k, v in weight_map.items() if not k.endswith(IGNORED_SUFFIXES)}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def dtype_of(self, name: str) -> str:
        code = self.headers[self.weight_map[name]][name]["dtype"]
        return {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}.get(code, code)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.weight_map[name]][name]["shape"])

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.path} has no tensor {name}")
        with safe_open(os.path.join(self.path, self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def shard_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def side_files(self) -> list[str]:
        """Config, generation config, tokenizer files...: everything but weights and subfolders."""
        out = []
        for name in sorted(os.listdir(self.path)):
            full = os.path.join(self.path, name)
            if os.path.isfile(full) and not name.endswith(WEIGHT_SUFFIXES) and name != INDEX_NAME:
                out.append(name)
        return out
