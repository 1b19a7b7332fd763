"""Is the ``--base`` an analysis is given the model an export was trained from?

Our exports (PEFT adapter or merged folder) carry ``milora_export.json`` with the sha256 of
every shard of the HF folder the base checkpoint was converted from. A same-shaped other
model (an Instruct variant, another fine-tune) would otherwise be analysed silently; an
export that records no base (a PEFT adapter trained elsewhere, an older export) cannot be
checked, and the tools say so.
"""

from __future__ import annotations

import json
import os

from ..checkpoint.atomic import sha256_file
from ..convert.hf_folder import HFFolder
from ..errors import CheckpointError

EXPORT_INFO = "milora_export.json"


def export_info(folder: str) -> dict | None:
    path = os.path.join(folder, EXPORT_INFO)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            info = json.load(f)
        except ValueError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return info


def unchecked_note(base_dir: str, exported_dir: str) -> str:
    """Why ``base_dir`` cannot be checked against ``exported_dir`` (one line)."""
    adapter = os.path.isfile(os.path.join(exported_dir, "adapter_config.json"))
    what = "adapter" if adapter else "merged folder"
    why = (f"its {EXPORT_INFO} has no base_shards" if os.path.isfile(os.path.join(exported_dir, EXPORT_INFO))
           else f"it has no {EXPORT_INFO} (not exported by milora-megatron)")
    named = ""
    if adapter:
        try:
            with open(os.path.join(exported_dir, "adapter_config.json")) as f:
                recorded = json.load(f).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            recorded = None  # (the adapter's own loading says what is wrong with it)
        if recorded:
            named = f"; its adapter_config.json names {recorded!r}"
    return (f"this {what} records no base checkpoint; the base cannot be checked: {exported_dir}: {why}, so "
            f"--base {base_dir} is taken on trust as the model it was trained from{named}")


def check_base(base_dir: str, exported_dir: str) -> str | None:
    """Raise if ``base_dir`` is not the HF model ``exported_dir`` was trained from, when the
    export records it (None: checked); an export that records no base cannot be checked, and
    the one-line note saying so is returned instead."""
    info = export_info(exported_dir) or {}
    recorded = info.get("base_shards")
    if not recorded:
        return unchecked_note(base_dir, exported_dir)
    base = HFFolder(base_dir)
    mine = set(base.shard_files())
    if mine != set(recorded):
        raise CheckpointError(f"--base {base_dir} is not the model {exported_dir} was trained from: its weight files "
                              f"{sorted(mine)[:3]} differ from {sorted(recorded)[:3]}")
    for name, want in recorded.items():
        if sha256_file(os.path.join(base.path, name)) != want["sha256"]:
            raise CheckpointError(f"--base {base_dir} is not the model {exported_dir} was trained from: "
                                  f"{name} differs (sha256)")
    return None
