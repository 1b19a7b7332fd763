"""Instruction and text data through the ``datasets`` library: local files -> prompt/response
token sequences with the loss on the response only -> fixed-length samples; general text
-> scored windows. Shared by the trainer and the analysis tools."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from .sources import DataSource, local, open_records
from .templates import TEMPLATES
from ..errors import DataError


def load_records(path: str):
    """A ``datasets.Dataset`` from a jsonl/json/parquet/txt file or a local dataset folder."""
    return open_records(path)


def _first_non_text(records, fields: tuple[str, ...]) -> tuple[int, str, object] | None:
    """(index, field, value) of the first value of ``fields`` that is not text (or missing)."""
    first = None
    for field in fields:
        if field not in records.column_names:
            continue
        feature = records.features[field]
        if getattr(feature, "dtype", None) in ("string", "large_string"):
            continue
        for index, value in enumerate(records[field]):
            if value is not None and not isinstance(value, str):
                if first is None or index < first[0]:
                    first = (index, field, value)
                break
    return first


def _first_missing(records, required: tuple[str, ...]) -> tuple[int, list[str]] | None:
    """(index, fields) of the first record lacking a required field, found column-wise."""
    import pyarrow.compute as pc

    first = None
    for field in required:
        if field not in records.column_names:
            first = 0
            break
        nulls = records.data.column(field).null_count
        if nulls:
            index = pc.index(pc.is_null(records.data.column(field)), True).as_py()
            first = index if first is None else min(first, index)
    if first is None:
        return None
    record = records[first]
    return first, [f for f in required if record.get(f) is None]


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable identity of a tokenizer (vocabulary, merges, special tokens, BOS/EOS handling),
    so a tokenised dataset is cached under it and reused by the other ranks."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.all_special_tokens))
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def tokenize_examples(source: DataSource | str, template: str, tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, loss mask) per record: BOS + prompt (mask 0) + response + EOS (mask 1).

    One batched ``datasets.map`` (the fast tokenizer works on whole batches), cached by
    ``datasets`` under a fingerprint of the records, where they came from (id, commit, subset,
    split, column map), the template and the tokenizer: the first process on a node
    tokenises, the others load its result (see ``Trainer``)."""
    source = local(source) if isinstance(source, str) else source
    template_ = TEMPLATES[template]
    records = open_records(source)
    label = source.label
    if len(records) == 0:
        raise DataError(f"{label} holds no records")
    lines = source.is_file and source.location.endswith(".jsonl") and not source.columns
    where = (lambda index: f"line {index + 1}") if lines else (lambda index: f"record index {index}")
    required = template_.required
    if template_.is_chat:
        required = (chat_column(records.column_names),)
    missing = _first_missing(records, required)
    if missing is not None:
        index, fields = missing
        absent = any(f not in records.column_names for f in fields)
        raise DataError(f"{label}, {where(index)}: missing field(s) {fields} required by the {template!r} template"
                        + (f" (its columns: {records.column_names}; map them with data.columns)" if absent else ""))
    key = f"{tokenizer_fingerprint(tokenizer)}|{records._fingerprint}|{sorted(source.record().items())}"
    if template_.is_chat:
        return _tokenize_chat(label, records, required[0], tokenizer, where, key)
    fmt = template_.format
    wrong = _first_non_text(records, (*required, *template_.optional))
    if wrong is not None:
        index, field, value = wrong
        raise DataError(f"{label}, {where(index)}: field {field!r} must be text, found {value!r}")
    eos = tokenizer.eos_token_id

    def encode(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        prompts, responses = zip(*(fmt(r) for r in rows))
        p = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        r = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        return {"input_ids": [a + b + [eos] for a, b in zip(p, r)], "prompt_len": [len(a) for a in p]}

    # the template's text is part of the key: a probe record formatted with it
    probe = repr(fmt({f: f"<{f}>" for f in (*required, *template_.optional)}))
    fingerprint = f"milora-{template}-{hashlib.sha256(f'{probe}|{key}'.encode()).hexdigest()[:32]}"
    mapped = records.map(encode, batched=True, batch_size=1000, remove_columns=records.column_names,
                         new_fingerprint=fingerprint, desc=f"tokenising {os.path.basename(source.name)}")
    out = []
    for ids, prompt_len in zip(mapped["input_ids"], mapped["prompt_len"]):
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.ones(len(ids), np.float32)
        mask[:prompt_len] = 0.0
        out.append((ids, mask))
    return out


def chat_column(columns) -> str:
    """``messages`` ({role, content} turns) or, failing that, ShareGPT's ``conversations``."""
    return "conversations" if "conversations" in columns and "messages" not in columns else "messages"


def _tokenize_chat(label: str, records, column: str, tokenizer, where, key: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Chat records (data/chat.py), cached like the others under the chat template's text."""
    from .chat import ConversationError, check_tokenizer, encode_conversation, from_sharegpt

    check_tokenizer(tokenizer)
    sharegpt = column == "conversations"

    def encode(batch, indices):
        ids, masks = [], []
        for turns, index in zip(batch[column], indices):
            try:
                i, m = encode_conversation(tokenizer, from_sharegpt(turns) if sharegpt else turns)
            except ConversationError as exc:
                raise DataError(f"{label}, {where(index)}: {exc}") from None
            ids.append(i.tolist())
            masks.append(m.tolist())
        return {"input_ids": ids, "loss_mask": masks}

    digest = hashlib.sha256(f"{tokenizer.chat_template}|{column}|{key}".encode()).hexdigest()
    mapped = records.map(encode, batched=True, batch_size=1000, with_indices=True, remove_columns=records.column_names,
                         new_fingerprint=f"milora-chat-{digest[:32]}", desc=f"tokenising {os.path.basename(label)}")
    return [(np.asarray(i, dtype=np.int64), np.asarray(m, dtype=np.float32))
            for i, m in zip(mapped["input_ids"], mapped["loss_mask"])]


def to_samples(examples, seq_len: int, pad_id: int, pack: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[N, seq_len + 1] tokens and loss masks, each example truncated/padded; or packed
    (data shorter than one sequence is padded instead), then with each token's position in
    its own example [N, seq_len + 1] (restarting at 0 where an example starts), from which
    the model builds attention that never crosses examples. Positions are None unpacked."""
    n = seq_len + 1
    if pack and sum(len(e[0]) for e in examples) >= n:
        ids = np.concatenate([e[0] for e in examples])
        mask = np.concatenate([e[1] for e in examples])
        positions = np.concatenate([np.arange(len(e[0]), dtype=np.int64) for e in examples])
        count = len(ids) // n  # the remainder (< one sequence) is dropped
        cut = lambda a: torch.from_numpy(a[: count * n].reshape(count, n).copy())  # noqa: E731
        return cut(ids), cut(mask), cut(positions)
    tokens = np.full((len(examples), n), pad_id, dtype=np.int64)
    masks = np.zeros((len(examples), n), dtype=np.float32)
    for i, (ids, mask) in enumerate(examples):
        k = min(len(ids), n)
        tokens[i, :k], masks[i, :k] = ids[:k], mask[:k]
    return torch.from_numpy(tokens), torch.from_numpy(masks), None


def text_samples(path: str, tokenizer, seq_len: int, max_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """General text (a ``text`` column or a .txt file) cut into seq_len + 1 token windows, all scored."""
    records = load_records(path)
    if "text" not in records.column_names:
        raise DataError(f"{path}: forgetting data needs a 'text' column (or a .txt file), found {records.column_names}")
    texts = [t for t in records["text"] if t]
    ids = [i for seq in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in seq] if texts else []
    n = seq_len + 1
    count = len(ids) // n
    if max_samples:
        count = min(count, max_samples)
    if count == 0:
        raise DataError(f"{path}: fewer than {n} tokens of text")
    tokens = torch.tensor(ids[: count * n], dtype=torch.int64).view(count, n)
    return tokens, torch.ones(count, n, dtype=torch.float32)
