"""Is the ``--base`` an analysis is given the model an export was trained from?

Our exports (PEFT adapter or merged folder) carry ``milora_export.json`` with the sha256 of
every shard of the HF folder the base checkpoint was converted from. A same-shaped other
model (an Instruct variant, another fine-tune) would otherwise be analysed silently.
"""

from __future__ import annotations

import json
import os

from ..checkpoint.atomic import sha256_file
from ..convert.hf_folder import HFFolder

EXPORT_INFO = "milora_export.json"


def export_info(folder: str) -> dict | None:
    path = os.path.join(folder, EXPORT_INFO)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_base(base_dir: str, exported_dir: str) -> None:
    """Raise if ``base_dir`` is not the HF model ``exported_dir`` was trained from (when the
    export records it; others cannot be checked)."""
    info = export_info(exported_dir) or {}
    recorded = info.get("base_shards")
    if not recorded:
        return
    base = HFFolder(base_dir)
    mine = set(base.shard_files())
    if mine != set(recorded):
        raise ValueError(f"--base {base_dir} is not the model {exported_dir} was trained from: its weight files "
                         f"{sorted(mine)[:3]} differ from {sorted(recorded)[:3]}")
    for name, want in recorded.items():
        if sha256_file(os.path.join(base.path, name)) != want["sha256"]:
            raise ValueError(f"--base {base_dir} is not the model {exported_dir} was trained from: "
                             f"{name} differs (sha256)")
