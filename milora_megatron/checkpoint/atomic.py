"""Crash-safe writes: everything is written under ``<final>.partial`` and renamed into place,
so a reader sees either no checkpoint or a complete one; and the checks that read files
back (checksums, safetensors headers)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct

from ..errors import CheckpointError, MissingPathError, OutputError, OutputExistsError, as_user_error

PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(folder)


@contextlib.contextmanager
def atomic_directory(final: str, overwrite: bool = False, group=None):
    """Yield a temporary folder that becomes ``final`` when the block completes.

    With a ``torch.distributed`` ``group`` every member enters, writes its own files into the
    same temporary folder (a shared filesystem across nodes), and the group's first rank
    commits it. On an exception the temporary folder is removed.
    """
    import torch.distributed as dist

    final = os.path.abspath(final)
    tmp = final + PARTIAL_SUFFIX
    lead = group is None or dist.get_rank(group) == 0
    if lead:
        if os.path.exists(final) and not overwrite:
            raise OutputExistsError(f"{final} already exists (pass --overwrite to replace it)")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed writer
        with _as_user_error(final):
            os.makedirs(tmp)
    if group is not None:
        dist.barrier(group=group)
    try:
        yield tmp
    except BaseException as exc:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        translated = as_user_error(exc, final)  # a full disk: one line naming the folder
        if translated is exc:
            raise
        raise translated from exc
    if group is not None:
        dist.barrier(group=group)
    if lead:
        with _as_user_error(final):
            _commit(tmp, final)
    if group is not None:
        dist.barrier(group=group)


@contextlib.contextmanager
def _as_user_error(path: str):
    """A full disk inside the block: one DiskFullError naming ``path``."""
    try:
        yield
    except OSError as exc:
        translated = as_user_error(exc, path)
        if translated is exc:
            raise
        raise translated from exc


def _commit(tmp: str, final: str) -> None:
    """``tmp`` becomes ``final``, durably; an old ``final`` is replaced without a window."""
    _fsync_tree(tmp)
    if os.path.exists(final):
        # never delete the old copy before the new one is in place: it is set aside,
        # the new one renamed in, then the old one removed. A kill between the two
        # renames leaves FINAL.replaced, complete, which readers accept.
        aside = final + REPLACED_SUFFIX
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(os.path.dirname(final))
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))


def read_json(path: str):
    """A JSON file, or a CheckpointError naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc})") from None


def check_recorded_files(folder: str, records: dict, checksums: bool, what: str, only=None) -> None:
    """Every file of ``records`` ({name: {"bytes", "sha256"}}) present, of its size, a readable
    safetensors header where it is one, and with ``checksums`` bit-identical to when it was
    written. ``only``: check these names alone. Raises naming the file."""
    for name, record in records.items():
        if only is not None and name not in only:
            continue
        full = os.path.join(folder, name)
        if not os.path.isfile(full):
            raise MissingPathError(f"{what} file {full} is missing (interrupted or damaged)")
        if os.path.getsize(full) != record["bytes"]:
            raise CheckpointError(f"{what} file {full} has {os.path.getsize(full)} bytes, expected {record['bytes']} "
                             "(truncated or replaced)")
        if name.endswith(".safetensors"):
            safetensors_header(full)
        if checksums and sha256_file(full) != record["sha256"]:
            raise CheckpointError(f"{what} file {full} does not match its checksum (changed since it was written)")


def check_writable(final: str) -> None:
    """Fail before the expensive work if ``final`` could not be created."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"cannot write {final}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {final}: {parent} is not writable")


def check_output(out: str, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse, before any expensive work, an output that exists (without ``overwrite``, which
    the user gives as ``flag``) or that cannot be created."""
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(f"{os.path.abspath(out)} already exists (pass {flag} to replace it)")
    check_writable(out)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise as_user_error(exc, path) from exc
    os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str, chunk: int = 1 << 23) -> str:
    """Streaming checksum (8 MiB reads: memory stays flat however big the file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file; raises ValueError naming the file if it is cut short."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"truncated safetensors file {path}: {size} bytes, no header")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"truncated safetensors file {path}: header needs {8 + n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"corrupt safetensors header in {path}: {exc}") from exc
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"corrupt safetensors header in {path}: no tensor offsets ({exc!r})") from None
    if 8 + n + end > size:
        raise CheckpointError(f"truncated safetensors file {path}: {size} bytes, its header needs {8 + n + end}")
    return header
