"""HF folder -> base checkpoint (see ``checkpoint.base`` for the format), one layer at a time."""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..checkpoint import base as fmt
from ..checkpoint.atomic import atomic_directory, check_output, sha256_file
from ..errors import CheckpointError, ConfigError, as_user_error
from ..models.decoder import DecoderShape
from . import hub
from .hf_folder import HFFolder
from ..mapping.decoder import (
    EMBEDDING,
    FINAL_NORM,
    LM_HEAD,
    hf_layer_prefix,
    hf_to_megatron_layer,
    megatron_layer_prefix,
)

log = logging.getLogger(__name__)


def expected_hf_shapes(shape: DecoderShape) -> dict[str, tuple[int, ...]]:
    """Every tensor the config implies, with its shape."""
    out = {EMBEDDING[0]: (shape.vocab, shape.hidden), FINAL_NORM[0]: (shape.hidden,)}
    if not shape.tied:
        out[LM_HEAD[0]] = (shape.vocab, shape.hidden)
    for i in range(shape.layers):
        out.update({hf_layer_prefix(i) + n: s for n, s in shape.layer_shapes(i).items()})
    return out


def check_hf_tensors(hf: HFFolder, shape: DecoderShape) -> None:
    """Names and shapes against the config (a transposed matrix has the right element count
    and would otherwise convert silently)."""
    expected = expected_hf_shapes(shape)
    present = set(hf.names())
    missing = [n for n in expected if n not in present]
    if missing:
        raise CheckpointError(f"{hf.path} lacks {len(missing)} tensor(s) the config implies, e.g. {missing[:3]}")
    extra = present - set(expected) - ({LM_HEAD[0]} if shape.tied else set())
    if extra:
        raise CheckpointError(f"{hf.path} has tensors a {shape.family} model does not have: {sorted(extra)[:5]}")
    for name, want in expected.items():
        got = hf.shape_of(name)
        if got != want:
            raise CheckpointError(f"{hf.path}: {name} has shape {list(got)}, the config implies {list(want)}")


def convert_hf_to_megatron(hf_dir: str, out: str, tp: int = 1, pp: int = 1, dtype: str | None = None,
                           overwrite: bool = False, progress: bool = True, revision: str | None = None,
                           ep: int = 1) -> str:
    """Write a base checkpoint at ``out`` (atomically). ``hf_dir``: a local folder or a Hub id
    (``revision``: a branch, tag or commit; the commit it resolved to is recorded). ``dtype``
    None keeps each tensor's own. ``tp``/``pp``/``ep`` are validated against the model and
    recorded as its default layout; the files fit any (experts are stored by global index)."""
    if dtype is not None and dtype not in fmt.DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(fmt.DTYPES)} or None (the source's), got {dtype!r}")
    hf_dir, hub_record = hub.resolve(hf_dir, revision)
    hf = HFFolder(hf_dir)
    shape = DecoderShape.from_hf_config(hf.config)
    if hf.wrapper is not None:
        print(f"{hf.wrapper.architecture}: reading its language model only, as {hf.config['architectures'][0]}; "
              f"the other {len(hf.left_out)} tensors (vision tower, projector) are left out, and exports are "
              "the text model", file=sys.stderr)
    shape.check_parallel(tp, pp, ep)
    check_hf_tensors(hf, shape)
    check_output(out, overwrite)

    shards = {}
    for shard in tqdm(hf.shard_files(), desc="checksum source shards", unit="shard", disable=not progress):
        full = os.path.join(hf.path, shard)
        shards[shard] = {"sha256": sha256_file(full), "bytes": os.path.getsize(full)}

    try:
        _write_checkpoint(hf, shape, out, overwrite, (tp, pp, ep), dtype, shards, hub_record, progress)
    except BaseException as exc:
        # a full disk anywhere in the write (atomic_directory's own folder and rename
        # included): one DiskFullError naming the output; an existing one is untouched
        translated = as_user_error(exc, os.path.abspath(out))
        if translated is exc:
            raise
        raise translated from exc
    log.info("wrote base checkpoint %s (%d layers, default TP=%d PP=%d EP=%d)", out, shape.layers, tp, pp, ep)
    return os.path.abspath(out)


def _write_checkpoint(hf: HFFolder, shape: DecoderShape, out: str, overwrite: bool, layout: tuple[int, int, int],
                      dtype: str | None, shards: dict, hub_record: dict | None, progress: bool) -> None:
    tp, pp, ep = layout
    target = fmt.DTYPES[dtype] if dtype else None
    files, weight_map = {}, {}

    def write(tmp: str, file: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: (v.to(target) if target else v).contiguous() for k, v in tensors.items()}
        path = os.path.join(tmp, file)
        save_file(tensors, path, metadata={"format": "pt"})
        files[file] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
        weight_map.update({k: file for k in tensors})

    with atomic_directory(out, overwrite=overwrite) as tmp:
        side = os.path.join(tmp, fmt.HF_SIDE_DIR)
        os.makedirs(side)
        for name in hf.side_files():
            shutil.copy2(os.path.join(hf.path, name), side)
        if hf.wrapper is not None:  # exports are the text model: its own config
            with open(os.path.join(side, "config.json"), "w") as f:
                json.dump(hf.config, f, indent=2)
        units = tqdm(total=shape.layers + 2, desc=f"convert {os.path.basename(hf.path)}", unit="part",
                     disable=not progress)
        write(tmp, "embedding.safetensors", {EMBEDDING[1]: hf.tensor(EMBEDDING[0])})
        units.update()
        for i in range(shape.layers):
            layer = {n: hf.tensor(hf_layer_prefix(i) + n) for n in shape.layer_shapes(i)}
            meg = hf_to_megatron_layer(layer, shape.layer_layouts(i), shape.norms, shape.sparse(i))
            del layer
            write(tmp, fmt.layer_file(i), {megatron_layer_prefix(i) + k: v for k, v in meg.items()})
            del meg
            units.update()
        final = {FINAL_NORM[1]: hf.tensor(FINAL_NORM[0])}
        if not shape.tied:
            final[LM_HEAD[1]] = hf.tensor(LM_HEAD[0])
        write(tmp, "final.safetensors", final)
        units.update()
        units.close()
        manifest = {
            "format": fmt.FORMAT, "version": fmt.VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": dtype or "source", "parallel": {"tp": tp, "pp": pp, **({"ep": ep} if shape.experts else {})},
            "hf_config": hf.config,
            "padded_vocab_multiple": "128 x TP (applied when a model is built; files hold the real vocabulary)",
            "source": {"hf_dir": hf.path, "shards": shards, **({"hub": hub_record} if hub_record else {}),
                       **({"wrapper": {"architecture": hf.wrapper.architecture, "left_out": len(hf.left_out),
                                       "module_prefix": hf.wrapper.module_prefix}} if hf.wrapper else {}),
                       "dtypes": {n: hf.dtype_of(n) for n in expected_hf_shapes(shape)}},
            "files": files, "weight_map": weight_map,
        }
        with open(os.path.join(tmp, fmt.MANIFEST), "w") as f:  # last: its presence marks completeness
            json.dump(manifest, f, indent=1, sort_keys=True)
