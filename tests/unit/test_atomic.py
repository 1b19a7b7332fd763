"""milora_megatron/checkpoint/atomic.py: a folder or file appears whole or not at all, an old
one is replaced without a window, and a cut-short safetensors file is named as such."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from milora_megatron.checkpoint.atomic import (PARTIAL_SUFFIX, atomic_directory, check_output, safetensors_header,
                                               sha256_file, write_json_atomic)
from milora_megatron.errors import CheckpointError, OutputError, OutputExistsError


def test_a_folder_appears_only_when_its_block_completes(tmp_path):
    final = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_directory(str(final)) as tmp:
            (Path(tmp) / "a.txt").write_text("half")
            assert tmp.endswith(PARTIAL_SUFFIX) and not final.exists()
            raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary
    with atomic_directory(str(final)) as tmp:
        (Path(tmp) / "a.txt").write_text("whole")
    assert (final / "a.txt").read_text() == "whole"


def test_an_existing_folder_is_kept_unless_replacing_is_asked_and_then_replaced_whole(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_directory(str(final)):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(str(final), overwrite=True) as tmp:
            raise RuntimeError("killed")
    assert (final / "old.txt").read_text() == "old"  # a failed replacement keeps the old copy
    with atomic_directory(str(final), overwrite=True) as tmp:
        (Path(tmp) / "new.txt").write_text("new")
    assert sorted(os.listdir(final)) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_json_file_is_replaced_whole(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_json_atomic(str(path), {"step": 1})
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        write_json_atomic(str(path), {"step": 2})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads(path.read_text()) == {"step": 1} and os.listdir(tmp_path) == ["run.json"]


def test_checksums_and_headers(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(64.0)}, str(path))
    data = path.read_bytes()
    assert sha256_file(str(path), chunk=7) == hashlib.sha256(data).hexdigest()
    assert safetensors_header(str(path))["w"]["shape"] == [64]
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated safetensors file .*its header needs"):
        safetensors_header(str(path))
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="no header"):
        safetensors_header(str(path))


def test_outputs_are_checked_before_the_work(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        check_output(str(tmp_path / "file"), overwrite=False)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output(str(tmp_path / "file" / "out"), overwrite=False)
    check_output(str(tmp_path / "new" / "out"), overwrite=False)
