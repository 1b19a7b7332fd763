"""Real training runs for the end-to-end tests: a tiny converted Llama with its data, and
torchrun of launch/pretrain_milora.py on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hf_tiny import alpaca_records, make_hf_model, make_tokenizer
from paths import ROOT

LAUNCH = os.path.join(ROOT, "launch", "pretrain_milora.py")
TORCHRUN_WRAPPER = os.path.join(ROOT, "launch", "torchrun_usr1.py")


def make_inputs(root, family: str = "llama", chat_template: str | None = None, **shape) -> str:
    """A tiny HF model (Llama unless ``family`` says otherwise; its tokenizer with
    ``chat_template`` when given) converted at TP2 x PP2 under ``root``, train/valid jsonl and
    general text beside it; returns the base checkpoint's path."""
    from milora_megatron.convert.importer import convert_hf_to_megatron

    records = alpaca_records(48)
    texts = [json.dumps(r) for r in records] * 4
    make_hf_model(str(root / "hf"), seed=7, vocab=512, family=family, **shape)
    make_tokenizer(str(root / "hf"), texts, vocab=512)
    if chat_template:
        (root / "hf" / "chat_template.jinja").write_text(chat_template)
    ckpt = convert_hf_to_megatron(str(root / "hf"), str(root / "ckpt"), tp=2, pp=2, progress=False)
    with open(root / "train.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    with open(root / "valid.jsonl", "w") as f:
        for r in alpaca_records(8, seed=1):
            f.write(json.dumps(r) + "\n")
    (root / "general.txt").write_text(" ".join(texts[:20]))
    return ckpt


def torchrun(nproc, overrides, env=None, launcher=None, **kwargs):
    """Popen of torchrun (or ``launcher``, e.g. TORCHRUN_WRAPPER) running the trainer."""
    start = [sys.executable, launcher] if launcher else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*start, "--standalone", "--nproc_per_node", str(nproc), LAUNCH,
           "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def common(root, ckpt, out, **extra) -> list[str]:
    """key=value overrides of a short, deterministic run."""
    items = {"model.load": ckpt, "data.train": str(root / "train.jsonl"), "output.dir": str(out),
             "train.iters": 5, "train.global_batch": 4, "train.micro_batch": 1, "train.seq_len": 256,
             "train.warmup": 1, "train.eval_every": 0, "peft.dropout": 0.0, "peft.rank": 4,
             "train.clip_grad": 0.05, "output.save_every": 0, **extra}
    return [f"{k}={v}" for k, v in items.items()]


def run(nproc, overrides, ok=True, **kwargs) -> str:
    """A finished run's output; by default asserting it exited 0."""
    proc = torchrun(nproc, overrides, **kwargs)
    text, _ = proc.communicate(timeout=300)
    if ok:
        assert proc.returncode == 0, text[-3000:]
    run.returncode = proc.returncode
    return text


def records(out) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(out) -> list[float]:
    return [r["loss"] for r in records(out) if "loss" in r]


def last_losses(out) -> dict[int, float]:
    """Step -> loss, the last record of each step (a resumed run repeats the steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def workers(out, launcher_pid) -> list[int]:
    """The trainer processes of a run (torchrun starts them in sessions of their own)."""
    found = subprocess.run(["pgrep", "-f", f"pretrain_milora.py.*output.dir={out}"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split() if int(p) != launcher_pid]
