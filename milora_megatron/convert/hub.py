"""A model named by its Hugging Face Hub id, resolved to a local folder by ``huggingface_hub``
(its cache, its authentication, ``HF_HUB_OFFLINE``); only weights, config and tokenizer files
are fetched."""

from __future__ import annotations

import os
import re

from ..errors import ConfigError, MissingPathError

# what a conversion reads: safetensors weights (+ index), config and generation config, tokenizer files
FETCHED = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt",
           "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _one_line(exc: BaseException) -> str:
    """huggingface_hub's messages run over several lines; a refusal is one."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not os.path.exists(spec)


def resolve(spec: str, revision: str | None = None) -> tuple[str, dict | None]:
    """(local folder, hub record or None): a local folder as it is; an ``org/name`` id through
    the Hub cache, with the commit it resolved to."""
    if os.path.isdir(spec) or not looks_like_hub_id(spec):
        if revision is not None:
            raise ConfigError(f"--revision applies to a Hub id, and {spec} is a local path")
        return spec, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        folder = snapshot_download(spec, revision=revision, allow_patterns=FETCHED)
    except LocalEntryNotFoundError as exc:
        raise MissingPathError(f"{spec} (revision {revision or 'main'}) is neither a local folder nor in the Hugging "
                               f"Face cache, and the Hub cannot be reached ({_one_line(exc)})") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise MissingPathError(f"Hub model {spec} (revision {revision or 'main'}) not found or not accessible "
                               f"(log in with `hf auth login` for gated models): {_one_line(exc)}") from None
    except HfHubHTTPError as exc:  # the Hub answered with an error (rate limit, outage, a gated file)
        raise MissingPathError(f"Hub model {spec} (revision {revision or 'main'}) cannot be fetched: "
                               f"{_one_line(exc)}") from None
    return folder, {"repo_id": spec, "revision": revision or "main", "commit": os.path.basename(os.path.normpath(folder))}
