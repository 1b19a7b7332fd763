"""A model named by its Hugging Face Hub id, resolved to a local folder by ``huggingface_hub``
(its cache, its authentication, ``HF_HUB_OFFLINE``); only weights, config and tokenizer files
are fetched."""

from __future__ import annotations

import os

from ..errors import ConfigError
from ..hub import looks_like_hub_id, snapshot

# what a conversion reads: safetensors weights (+ index), config and generation config, tokenizer files
FETCHED = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt",
           "*.jinja"]


def resolve(spec: str, revision: str | None = None) -> tuple[str, dict | None]:
    """(local folder, hub record or None): a local folder as it is; an ``org/name`` id through
    the Hub cache, with the commit it resolved to."""
    if os.path.isdir(spec) or not looks_like_hub_id(spec):
        if revision is not None:
            raise ConfigError(f"--revision applies to a Hub id, and {spec} is a local path")
        return spec, None
    folder, commit = snapshot(spec, revision, kind="model", allow_patterns=FETCHED)
    return folder, {"repo_id": spec, "revision": revision or "main", "commit": commit}
