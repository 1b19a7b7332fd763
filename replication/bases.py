"""The replication's base models and the schedule each fits on 2 CPU cores.

``scratch`` (the default) pre-trains a ~5M-parameter Llama on the docstring corpus: nothing
downloaded, the whole sweep in ~85 minutes. ``smollm2`` is SmolLM2-135M-Instruct, a real
pre-trained model (so forgetting is measured on a model that knows something): ~30x the
compute per step, so on CPU its schedule is cut to what fits an hour.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

SCRATCH_SHAPE = dict(layers=4, hidden=256, heads=8, kv_heads=2, ffn=688, vocab=4096)


@dataclass(frozen=True)
class BaseChoice:
    name: str
    tp: int  # of the 2 training ranks (SmolLM2's 9 heads allow TP 1 or 3)
    lr: float | None  # the sweep's unit; None: the config's
    iters: int
    seeds: str
    sweep_seeds: str  # at the lr scales other than x1 ("" = the same as seeds)
    extra_seeds: str
    lr_scales: str
    work: str  # under runs/
    report: str  # under replication/results/ ("" = that folder itself)
    cut: str  # what the schedule leaves out, for the report
    make_target: str  # the Makefile target that runs this schedule


BASES = {
    "scratch": BaseChoice("scratch", tp=2, lr=None, iters=300, seeds="1,2", sweep_seeds="", extra_seeds="3", lr_scales="0.5,1,2",
                          work="replication", report="", cut="300 steps per run (400 before the sweep)",
                          make_target="make replicate"),
    "smollm2": BaseChoice("smollm2", tp=1, lr=3e-4, iters=40, seeds="1,2", sweep_seeds="1", extra_seeds="",
                          lr_scales="0.5,1,2", work="replication_smollm2", report="smollm2_cpu",
                          cut="40 steps of 16 problems per run (0.3 epochs); 2 seeds at the paper's lr 3e-4 (x1) and one "
                              "at x0.5 and x2, no third seed: a run of the 135M model takes ~7 minutes on 2 cores",
                          make_target="make replicate-smollm2"),
}


def prepare_scratch(hf_dir: str, train_txt: str, held_txt: str, steps: int, log) -> dict:
    """Pre-train the small Llama (cached: pretrain.json marks it done)."""
    from milora_megatron.data import PREAMBLE
    from milora_megatron.models.tiny_hf import make_tokenizer

    from .pretrain import pretrain

    done = os.path.join(hf_dir, "pretrain.json")
    if not os.path.exists(done):
        log(f"2. pre-training a small Llama {SCRATCH_SHAPE} for {steps} steps")
        texts = open(train_txt, encoding="utf-8").read().splitlines()
        make_tokenizer(hf_dir, texts + [PREAMBLE] * 50, vocab=SCRATCH_SHAPE["vocab"])
        pretrain(hf_dir, train_txt, held_txt, steps=steps, batch=16, seq_len=256, lr=2e-3, seed=0,
                 shape=SCRATCH_SHAPE, log=lambda m: log("   " + m))
    pre = json.load(open(done))
    log(f"   base model: {pre['parameters'] / 1e6:.2f}M parameters, held-out loss {pre['heldout_loss']}")
    return pre


def prepare_smollm2(log) -> tuple[str, dict]:
    """SmolLM2-135M-Instruct as a bf16 HF folder (downloaded and dequantized once)."""
    from milora_megatron.convert.packaged import SMOLLM2, hf_folder

    start = time.time()
    hf = hf_folder(SMOLLM2, log=lambda m: log("2. " + m))
    config = json.load(open(os.path.join(hf, "config.json")))
    from safetensors import safe_open

    params = 0
    for f in os.listdir(hf):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(hf, f), "pt") as h:
                params += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
    pre = {"parameters": params, "minutes": (time.time() - start) / 60, "source": SMOLLM2.package,
           "layers": config["num_hidden_layers"], "hidden": config["hidden_size"]}
    log(f"   base model: SmolLM2-135M-Instruct, {params / 1e6:.1f}M parameters ({hf})")
    return hf, pre


def describe(choice: BaseChoice, pre: dict, info: dict) -> str:
    """The report's base-model line."""
    if choice.name == "smollm2":
        return (f"SmolLM2-135M-Instruct (Apache-2.0; {pre['parameters'] / 1e6:.1f}M parameters, {pre['layers']} layers, "
                f"hidden {pre['hidden']}), the GGUF (Q4_1) inside the package {pre['source']} dequantized to bf16 "
                f"(milora_megatron.convert.packaged): a real pre-trained model, not trained further here")
    return (f"Llama {SCRATCH_SHAPE}, {pre['parameters'] / 1e6:.2f}M parameters, pre-trained from scratch for\n"
            f"  {pre['steps']} steps x {pre['batch']} x {pre['seq_len']} tokens on {info['train.txt']['chars'] / 1e6:.2f}M "
            f"characters\n  of docstrings from Python's standard library and torch (corpus sha256 {info['sha256'][:16]}); "
            f"held-out loss\n  {pre['heldout_loss']} on docstrings of source files it never saw")
