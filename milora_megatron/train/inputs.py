"""A run's inputs: its data sources resolved (a Hub id pinned to one commit for every node),
tokenised once per node, cut into samples, and validation held out where asked."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ..data import text_samples, to_samples, tokenize_examples
from ..data.sources import DataSource, resolve
from ..errors import ConfigError, DataError, RunFolderError


@dataclass
class Data:
    """Samples as (tokens, masks[, positions]): positions only for packed ones (batches.sample_parts);
    ``sources`` is what run.json records of where they came from."""

    train: tuple
    valid: tuple | None
    forgetting: tuple[torch.Tensor, torch.Tensor] | None
    sources: dict = field(default_factory=dict)


def resolve_sources(d, pinned: dict | None = None) -> tuple[DataSource, DataSource | None]:
    """data.train and where validation comes from; a Hub dataset at ``pinned[role]``'s commit
    when given (the one rank 0 resolved), else at data.revision."""
    pinned = pinned or {}
    train = resolve(d.train, pinned.get("train") or d.revision, d.subset, d.split, d.columns)
    if d.valid:
        valid = resolve(d.valid, pinned.get("valid") or "", "", d.valid_split or "train", d.columns)
    elif d.valid_split:
        valid = train.with_split(d.valid_split)
    else:
        valid = None
    return train, valid


def hold_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded ``fraction`` of the examples for validation, in their order."""
    n = len(examples)
    count = max(1, round(n * fraction))
    if count >= n:
        raise DataError(f"data.valid_fraction={fraction} of {n} examples leaves nothing to train on")
    held = np.sort(np.random.RandomState(seed).permutation(n)[:count])
    mask = np.zeros(n, bool)
    mask[held] = True
    return [e for e, h in zip(examples, mask) if not h], [examples[i] for i in held]


def load_data(cfg, base, host_group=None) -> Data:
    """Tokenise the data. Rank 0 resolves the sources first (a Hub dataset is fetched once and
    its commit pinned for all); then the first process of each node tokenises (one batched
    ``datasets.map``, cached by ``datasets``) and the node's other processes load that,
    waiting on ``host_group`` (gloo: never an NCCL barrier while one rank works on the CPU)."""
    from transformers import AutoTokenizer

    if not cfg.data.train:
        raise ConfigError("data.train is not set")
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if dist.get_rank() != 0:
        import datasets

        datasets.disable_progress_bars()
    t, d = cfg.train, cfg.data

    def samples(examples, label):
        tokens, masks, positions = to_samples(examples, t.seq_len, pad, d.pack)
        keep = masks[:, 1:].sum(1) > 0
        if not keep.any():
            raise DataError(f"{label}: no example keeps a response token within train.seq_len={t.seq_len} "
                            "(the prompts are longer); raise train.seq_len")
        if not keep.all() and dist.get_rank() == 0:
            print(f"warning: {label}: {int((~keep).sum())} of {len(keep)} examples have no response token within "
                  f"train.seq_len={t.seq_len} and are skipped", flush=True)
        return tokens[keep], masks[keep], None if positions is None else positions[keep]

    def read() -> Data:
        train, valid = resolved if resolved is not None else resolve_sources(d, pinned)
        examples, validation = tokenize_examples(train, d.template, tok), None
        if d.valid_fraction:
            examples, validation = hold_out(examples, d.valid_fraction, t.seed)
        elif valid is not None:
            validation = tokenize_examples(valid, d.template, tok)
        forgetting = (text_samples(d.forgetting, tok, t.seq_len, max_samples=t.eval_batches * t.micro_batch)
                      if d.forgetting else None)
        sources = {"train": train.record(), **({"valid": valid.record()} if valid is not None else {})}
        valid_label = valid.label if valid is not None else f"{train.label} (held out)"
        return Data(samples(examples, train.label),
                    samples(validation, valid_label) if validation is not None else None, forgetting, sources)

    tok = AutoTokenizer.from_pretrained(base.hf_side_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pinned, resolved = _resolved_on_rank0(d, host_group)
    if not first_on_node:
        dist.barrier(group=host_group)
    try:
        data, error = read(), None
    except Exception as exc:  # the node's other ranks meet the same error after the barrier
        data, error = None, exc
    if first_on_node:
        dist.barrier(group=host_group)
    if error is not None:
        raise error
    return data


def _resolved_on_rank0(d, host_group) -> tuple[dict, tuple | None]:
    """(the commits rank 0's sources resolved to, rank 0's sources themselves): every node
    reads the same data even if a branch moves meanwhile, and rank 0 does not resolve twice.
    A failure there is every rank's (raised after the broadcast)."""
    result, sources = {}, None
    if dist.get_rank() == 0:
        try:
            sources = resolve_sources(d)
            result = {role: s.commit for role, s in zip(("train", "valid"), sources) if s is not None and s.commit}
        except Exception as exc:
            result = {"error": exc}
    box = [result]
    dist.broadcast_object_list(box, src=0, group=host_group)
    if "error" in box[0]:
        raise box[0]["error"]
    return box[0], sources


def check_same_data(recorded: dict | None, now: dict) -> None:
    """A resume trains on the commit of data.train that the run recorded, or not at all."""
    then = (recorded or {}).get("train", {}).get("commit")
    commit = now.get("train", {}).get("commit")
    if then and then != commit:
        name = now["train"]["name"]
        raise RunFolderError(f"data.train {name} now resolves to commit {commit}, and this run was trained on "
                             f"{then}: resume with data.revision={then}, or use another output.dir")
