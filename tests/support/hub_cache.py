"""A Hugging Face Hub cache laid out on disk as huggingface_hub lays it out (blobs named by
their hash, snapshots/<commit>/ linking to them, refs/<branch> naming a commit), so the
data tests run offline against real Hub-dataset resolution."""

from __future__ import annotations

import hashlib
import io
import json
import os

# ChatML with transformers' generation markers: its assistant mask is the reference for ours
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
          "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHAREGPT = [{"conversations": [{"from": "system", "value": "You add numbers."},
                               {"from": "human", "value": f"What is {a} plus {b}?"},
                               {"from": "gpt", "value": f"{a} plus {b} is {a + b}."},
                               {"from": "human", "value": "And doubled?"},
                               {"from": "gpt", "value": f"It is {2 * (a + b)}."}]}
            for a, b in [(2, 3), (4, 4), (10, 7)]]
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def renamed(records: list[dict]) -> list[dict]:
    """Alpaca records under a dataset's own column names (question, context, answer)."""
    return [{"question": r["instruction"], "context": r.get("input", ""), "answer": r["output"]} for r in records]


def as_messages(record: dict) -> list[dict]:
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]


def parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def add_commit(hub_cache: str, repo_id: str, files: dict[str, bytes], commit: str, branch: str | None = "main",
               kind: str = "dataset") -> str:
    """One commit of ``repo_id`` in the cache; ``branch`` (when given) points at it. Returns
    the snapshot folder."""
    repo = os.path.join(hub_cache, f"{kind}s--{repo_id.replace('/', '--')}")
    snapshot = os.path.join(repo, "snapshots", commit)
    for rel, data in files.items():
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(snapshot, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if branch:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", branch), "w") as f:
            f.write(commit)
    return snapshot


def offline_env(hf_home: str) -> dict[str, str]:
    """The environment of a process that must find everything in ``hf_home``'s cache."""
    return {"HF_HOME": hf_home, "HF_HUB_CACHE": os.path.join(hf_home, "hub"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}
