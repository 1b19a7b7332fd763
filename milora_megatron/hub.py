"""The Hugging Face Hub, for models and datasets alike: an ``org/name`` id resolved by
``huggingface_hub`` to a snapshot folder in its cache (``HF_HOME`` / ``HF_HUB_CACHE``, its
tokens, ``HF_HUB_OFFLINE``), named by the commit it resolved to. Its refusals become one line.
"""

from __future__ import annotations

import os
import re

from .errors import MissingPathError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def one_line(exc: BaseException) -> str:
    """huggingface_hub's messages run over several lines; a refusal is one."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not os.path.exists(spec)


def offline(kind: str = "model") -> bool:
    """HF_HUB_OFFLINE, and for a dataset also HF_DATASETS_OFFLINE, as the libraries read them."""
    from huggingface_hub import constants

    datasets_flag = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or (kind == "dataset" and datasets_flag)


def snapshot(repo_id: str, revision: str | None, kind: str = "model",
             allow_patterns: list[str] | None = None) -> tuple[str, str]:
    """(snapshot folder, commit) of a Hub repo of ``kind`` (model | dataset), from the cache
    when it is there for that revision and the Hub is not asked (offline), else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    what = f"Hub {kind} {repo_id} (revision {revision or 'main'})"
    is_offline = offline(kind)
    try:
        folder = snapshot_download(repo_id, repo_type=kind, revision=revision or None, allow_patterns=allow_patterns,
                                   local_files_only=is_offline)
    except LocalEntryNotFoundError as exc:
        if is_offline:
            from huggingface_hub import constants

            switch = "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else "HF_DATASETS_OFFLINE"
            raise MissingPathError(f"{repo_id} is not a local path, and the {kind} (revision {revision or 'main'}) "
                                   f"is not in the Hugging Face cache ({_cache_dir()}) while {switch}=1: "
                                   f"unset {switch} to download it, or fetch it into that cache first") from None
        raise MissingPathError(f"{repo_id} is neither a local path nor in the Hugging Face cache, and the Hub cannot "
                               f"be reached ({one_line(exc)})") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise MissingPathError(f"{what} not found or not accessible (for a private or gated repo, set HF_TOKEN or "
                               f"log in with `hf auth login`): {one_line(exc)}") from None
    except HfHubHTTPError as exc:  # the Hub answered with an error (rate limit, outage, a gated file)
        raise MissingPathError(f"{what} cannot be fetched: {one_line(exc)}") from None
    return folder, os.path.basename(os.path.normpath(folder))


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
