"""A GGUF file (llama.cpp's format, often quantized) -> an ordinary Hugging Face folder, so
that models shipped only as GGUF can be converted and fine-tuned like any other.

transformers reads the file (with the ``gguf`` package) and dequantizes every weight; the
folder gets the weights in ``dtype``, the config, and the tokenizer with its chat template
when the file carries one. A quantized source stays what it is: the dequantized weights are
the model as the GGUF defines it, not the original full-precision checkpoint.
"""

from __future__ import annotations

import os

from ..checkpoint.atomic import atomic_directory
from ..errors import ConfigError, MissingPathError

DTYPES = ("bfloat16", "float16", "float32")


def has_tokenizer(gguf_path: str) -> bool:
    from gguf import GGUFReader

    return "tokenizer.ggml.model" in GGUFReader(gguf_path).fields


def gguf_to_hf(gguf_path: str, out: str, dtype: str = "bfloat16", overwrite: bool = False) -> str:
    """Write ``out`` (atomically) from ``gguf_path``; returns its absolute path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from ..checkpoint.atomic import check_output

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not os.path.isfile(gguf_path):
        raise MissingPathError(f"GGUF file {gguf_path} does not exist")
    check_output(os.path.abspath(out), overwrite, flag="overwrite")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype),
                                                 quantization_config=GgufConfig(dequantize=True))
    # the weights are dense now: the folder is an ordinary, unquantized checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if has_tokenizer(gguf_path):
            AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    return os.path.abspath(out)
