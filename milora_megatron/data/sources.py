"""Where a data set comes from and how its records are read: a local file, a local folder
(a ``save_to_disk`` one, or files laid out like a dataset repo), or a Hugging Face dataset id.

A Hub id resolves through the Hub cache (``milora_megatron/hub.py``) to a snapshot folder
named by its commit, and ``datasets`` reads that folder as it reads any dataset repo (the
README's configs, the split names in file names). The commit is the data's identity: run.json
records it and a resume whose data resolved to another commit is refused. ``data.columns``
renames a dataset's own columns onto the template's fields before anything reads them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..errors import ConfigError, DataError, MissingPathError
from ..hub import looks_like_hub_id, one_line, snapshot
from ..schema import parse_pairs

FILE_KINDS = {"jsonl": "json", "json": "json", "parquet": "parquet", "txt": "text"}


@dataclass(frozen=True)
class DataSource:
    name: str  # as the config wrote it: a path or an org/name id
    location: str  # the local file or folder that is read
    commit: str | None = None  # a Hub dataset's resolved commit
    subset: str = ""
    split: str = "train"
    columns: tuple[tuple[str, str], ...] = ()  # (the dataset's column, the template's field)

    @property
    def is_file(self) -> bool:
        return os.path.isfile(self.location)

    @property
    def label(self) -> str:
        """How messages name it: the file, or the dataset with the subset and split read."""
        if self.is_file:
            return self.name
        return ", ".join([self.name, *([f"subset {self.subset!r}"] if self.subset else []), f"split {self.split!r}"])

    def record(self) -> dict:
        """What run.json keeps of it; a Hub dataset's commit is what a resume must find again."""
        return {"name": self.name, **({"commit": self.commit} if self.commit else {}), "subset": self.subset,
                "split": self.split, "columns": dict(self.columns)}

    def with_split(self, split: str) -> "DataSource":
        return dataclasses.replace(self, split=split)


def parse_columns(value) -> tuple[tuple[str, str], ...]:
    """``data.columns`` as (dataset column, template field) pairs, from ``a:b,c:d`` or a mapping."""
    if not value:
        return ()
    if isinstance(value, dict):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    elif isinstance(value, str):
        pairs = parse_pairs("data.columns", value)
    else:
        raise ConfigError(f"data.columns must be column:field pairs or a mapping, got {value!r}")
    targets = [field for _, field in pairs]
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        raise ConfigError(f"data.columns maps more than one column onto {twice}")
    return tuple(pairs)


def resolve(name: str, revision: str = "", subset: str = "", split: str = "train", columns=None) -> DataSource:
    """A local path as it is; an ``org/name`` id through the Hub cache, at ``revision``."""
    pairs = parse_columns(columns)
    if os.path.exists(name):
        return DataSource(name, name, None, subset, split, pairs)
    if looks_like_hub_id(name) and name.rsplit(".", 1)[-1].lower() not in FILE_KINDS:
        folder, commit = snapshot(name, revision or None, kind="dataset")
        return DataSource(name, folder, commit, subset, split, pairs)
    raise MissingPathError(f"data file {name} does not exist")


def local(path: str) -> DataSource:
    if not os.path.exists(path):
        raise MissingPathError(f"data file {path} does not exist")
    return DataSource(path, path)


def open_records(source: DataSource | str):
    """The source's split as a ``datasets.Dataset``, its columns renamed by ``data.columns``."""
    source = local(source) if isinstance(source, str) else source
    if source.is_file:
        if source.split != "train" or source.subset:
            raise DataError(f"{source.name} is one file, which is one split ('train') without subsets: "
                            f"leave data.split and data.subset at their defaults")
        records = _read_file(source.location)
    elif _saved_to_disk(source.location):
        records = _read_saved(source)
    else:
        records = _read_repo(source)
    return _rename(records, source)


def _saved_to_disk(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in ("dataset_dict.json", "state.json"))


def _read_saved(source: DataSource):
    import datasets

    records = datasets.load_from_disk(source.location)
    if not isinstance(records, datasets.DatasetDict):
        if source.split != "train":
            raise DataError(f"{source.name} holds one dataset, no splits: leave data.split at 'train'")
        return records
    splits = list(records)
    if source.split in records:
        return records[source.split]
    if source.split == "train" and len(splits) == 1:  # a dict of one split, whatever its name
        return records[splits[0]]
    raise DataError(f"{source.name} has no split {source.split!r}; its splits: {splits} (set data.split)")


def _read_repo(source: DataSource):
    """A dataset repo's folder (a Hub snapshot or a local copy): subsets and splits as the
    ``datasets`` library finds them, a wrong one answered with the list of those there are."""
    import datasets

    where = source.name + (f" (commit {source.commit[:12]})" if source.commit else "")
    try:
        subsets = datasets.get_dataset_config_names(source.location)
    except Exception as exc:  # no data files, an unreadable README
        raise DataError(f"{where} cannot be read as a dataset: {one_line(exc)}") from None
    if source.subset and source.subset not in subsets:
        raise DataError(f"{where} has no subset {source.subset!r}; its subsets: {subsets} (set data.subset)")
    if not source.subset and len(subsets) > 1 and "default" not in subsets:
        raise DataError(f"{where} has several subsets and none is the default; choose one with data.subset: {subsets}")
    splits = datasets.get_dataset_split_names(source.location, config_name=source.subset or None)
    if source.split not in splits:
        raise DataError(f"{where} has no split {source.split!r}; its splits: {splits} (set data.split)")
    try:
        return datasets.load_dataset(source.location, name=source.subset or None, split=source.split)
    except Exception as exc:
        raise DataError(f"{where}, split {source.split!r}: cannot be read ({type(exc).__name__}: {one_line(exc)})") \
            from None


def _rename(records, source: DataSource):
    if not source.columns:
        return records
    present = records.column_names
    missing = [column for column, _ in source.columns if column not in present]
    if missing:
        raise DataError(f"{source.label}: data.columns names column(s) {missing} that it does not have; its columns: "
                        f"{present}")
    mapping = dict(source.columns)
    # a column already bearing a mapped field's name gives way: the map says which one is meant
    shadowed = [c for c in present if c in mapping.values() and c not in mapping]
    if shadowed:
        records = records.remove_columns(shadowed)
    return records.rename_columns(mapping)


def _read_file(path: str):
    import datasets

    ext = path.rsplit(".", 1)[-1].lower()
    kind = FILE_KINDS.get(ext)
    if kind is None:
        raise DataError(f"{path}: unsupported data file type .{ext} (jsonl, json, parquet, txt or a save_to_disk folder)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty")
    if kind in ("json", "text"):
        _check_utf8(path)  # datasets would replace bad bytes silently
    try:
        return datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as exc:  # datasets names neither the file nor the line: find them
        problem = _first_bad_jsonl_line(path) if ext == "jsonl" else None
        raise DataError(f"{path}: {problem or f'cannot be read as {ext} ({type(exc).__name__}: {exc})'}") from exc


def _check_utf8(path: str, chunk: int = 1 << 24) -> None:
    """Raise naming the line of the first byte sequence that is not UTF-8 (streamed)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 1
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                line = lines + block[: exc.start].count(b"\n")
                raise DataError(f"{path}, line {line}: bytes that are not UTF-8 text ({exc.reason})") from None
            lines += block.count(b"\n")


def _first_bad_jsonl_line(path: str) -> str | None:
    import json

    seen = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            seen = True
            try:
                value = json.loads(line)
            except ValueError as exc:
                return f"line {number} is not valid JSON ({exc})"
            if not isinstance(value, dict):
                return f"line {number} is not a JSON object"
    return None if seen else "holds no records"
