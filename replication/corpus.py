"""The pre-training corpus: docstrings of Python's standard library and of torch.

Real English technical prose written by people, on every machine that runs this project
(no download), under permissive licences (PSF, BSD). Split by source file, so the held-out
text used for the forgetting measure comes from modules the model never saw.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import sysconfig

SKIP_DIRS = {"site-packages", "test", "tests", "testing", "idlelib", "lib2to3", "__pycache__", "turtledemo",
             "ensurepip", "_vendor"}
MIN_CHARS = 80  # one-line docstrings ("Return x.") carry little language


def source_roots() -> list[tuple[str, str]]:
    torch_dir = os.path.dirname(importlib.util.find_spec("torch").origin)
    return [("stdlib", sysconfig.get_paths()["stdlib"]), ("torch", torch_dir)]


def _python_files(root: str):
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(here, name)


def docstrings(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_CHARS:
                out.append(" ".join(doc.split()))  # one document per line
    return out


def build(out_dir: str, held_out_every: int = 20) -> dict:
    """``train.txt`` and ``heldout.txt`` (one docstring per line); every ``held_out_every``-th
    source file goes to the held-out side. Returns sizes and a sha256 of both files."""
    os.makedirs(out_dir, exist_ok=True)
    train, held = [], []
    index = 0
    for _name, root in source_roots():
        for path in _python_files(root):
            docs = docstrings(path)
            if not docs:
                continue
            (held if index % held_out_every == held_out_every - 1 else train).extend(docs)
            index += 1
    info = {"sources": [f"{n}: {r}" for n, r in source_roots()], "files_with_docstrings": index}
    digest = hashlib.sha256()
    for name, docs in (("train.txt", train), ("heldout.txt", held)):
        text = "\n".join(docs) + "\n"
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
        digest.update(text.encode())
        info[name] = {"documents": len(docs), "chars": len(text)}
    info["sha256"] = digest.hexdigest()
    return info
