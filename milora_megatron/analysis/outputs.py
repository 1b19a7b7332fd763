"""Writing the analysis tools' outputs (JSON reports, figures): what cannot be written is
the user's to fix (a full disk, a parent that is a file, no permission), said in one line."""

from __future__ import annotations

import json
import os

from ..errors import OutputError, as_user_error


def output_error(exc: OSError, path: str) -> Exception:
    """``exc``, raised writing ``path``, as the user error it stands for: a full disk, else
    the folder or file the OS refused."""
    translated = as_user_error(exc, path)
    if translated is not exc:
        return translated
    parent = os.path.dirname(os.path.abspath(path))
    while parent != os.path.dirname(parent) and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return OutputError(f"cannot write {path}: {parent} is a file, not a folder")
    where = f" ({exc.filename})" if exc.filename and os.path.abspath(exc.filename) != os.path.abspath(path) else ""
    return OutputError(f"cannot write {path}: {exc.strerror or exc}{where}")


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON at ``path`` (its folder created), never half-written: a
    temporary file beside it is renamed into place."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise output_error(exc, path) from exc
