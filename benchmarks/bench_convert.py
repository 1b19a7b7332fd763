#!/usr/bin/env python
"""Converter benchmark: a Llama-3-8B-shaped HF folder with random bf16 weights (~16 GB, written
here, never committed), converted HF -> megatron and back (merged, with a random rank-32
MiLoRA adapter on the paper's targets) with peak RSS and wall time of each direction,
next to the time to just read the files.

    python benchmarks/bench_convert.py --work /tmp/bench_convert [--layers 32] [--tp 8]

Each direction runs as its own process under psutil sampling (RSS of the process, 20 ms).
"""

import argparse
import json
import os
import sys
import threading
import time

import psutil
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False,
}


def write_random_hf(folder: str, layers: int) -> None:
    """HF-style shards of about 5 GB, one layer's tensors at a time."""
    from safetensors.torch import save_file

    cfg = dict(LLAMA3_8B, num_hidden_layers=layers)
    os.makedirs(folder, exist_ok=True)
    h, f, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * 128
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    tensors = [("model.embed_tokens.weight", lambda: rnd(cfg["vocab_size"], h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", lambda: torch.ones(h, dtype=torch.bfloat16)),
            (p + "post_attention_layernorm.weight", lambda: torch.ones(h, dtype=torch.bfloat16)),
            (p + "self_attn.q_proj.weight", lambda: rnd(h, h)), (p + "self_attn.k_proj.weight", lambda: rnd(kv, h)),
            (p + "self_attn.v_proj.weight", lambda: rnd(kv, h)), (p + "self_attn.o_proj.weight", lambda: rnd(h, h)),
            (p + "mlp.gate_proj.weight", lambda: rnd(f, h)), (p + "mlp.up_proj.weight", lambda: rnd(f, h)),
            (p + "mlp.down_proj.weight", lambda: rnd(h, f)),
        ]
    tensors += [("model.norm.weight", lambda: torch.ones(h, dtype=torch.bfloat16)),
                ("lm_head.weight", lambda: rnd(cfg["vocab_size"], h))]
    limit = 5 * 10**9  # HF's usual shard size for this model
    weight_map, pending = {}, {}

    def flush():
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(pending, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in pending})
        pending.clear()

    for key, make in tensors:
        pending[key] = make()
        if sum(t.numel() * 2 for t in pending.values()) >= limit:
            flush()
    if pending:
        flush()
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in set(weight_map.values()))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)


def write_random_adapter(run: str, base_path: str, rank: int = 32) -> None:
    """A MiLoRA adapter checkpoint (A, B, A0, B0 random, fp32) in the run-folder format."""
    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.checkpoint.adapters import step_dir, write_adapter_checkpoint
    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.mapping import PROJECTIONS

    base = BaseCheckpoint(base_path)
    s = base.shape
    kv = s.kv_heads * s.kv_channels
    dims = {"q_proj": (s.hidden, s.hidden), "k_proj": (kv, s.hidden), "v_proj": (kv, s.hidden),
            "up_proj": (s.ffn, s.hidden), "down_proj": (s.hidden, s.ffn)}
    cfg = AdapterConfig(method="milora", rank=rank)
    factors = {}
    for i in range(s.layers):
        for t in cfg.targets:
            out_, in_ = dims[t]
            m = PROJECTIONS[t].hf_module(i)
            for name, shape in (("lora_A", (rank, in_)), ("lora_B", (out_, rank)), ("lora_A0", (rank, in_)), ("lora_B0", (out_, rank))):
                factors[f"{m}.{name}"] = torch.randn(shape) * 0.01
    write_adapter_checkpoint(step_dir(run, 1), factors, cfg, base, step=1)


def measured(cmd: list[str]) -> dict:
    """Wall time and peak RSS (process tree, sampled every 20 ms) of a command."""
    start = time.time()
    proc = psutil.Popen(cmd)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rc = proc.wait()
    done.set()
    thread.join()
    if rc:
        raise SystemExit(f"{cmd} failed with {rc}")
    return {"wall_s": round(time.time() - start, 1), "peak_rss_gib": round(peak / 2**30, 2)}


def read_time(folder: str) -> float:
    start = time.time()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    return round(time.time() - start, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench_convert", help="scratch folder (needs ~50 GB for 32 layers)")
    p.add_argument("--layers", type=int, default=32, help="layers of the Llama-3-8B shape (32 = full size)")
    p.add_argument("--tp", type=int, default=8, help="TP size given to the converter")
    p.add_argument("--keep", action="store_true", help="keep the scratch files")
    args = p.parse_args()
    hf, ckpt, run, out = (os.path.join(args.work, n) for n in ("hf", "ckpt", "run", "merged"))
    import shutil

    for d in (ckpt, run, out):
        shutil.rmtree(d, ignore_errors=True)
    if not os.path.isfile(os.path.join(hf, "model.safetensors.index.json")):
        t = time.time()
        write_random_hf(hf, args.layers)
        print(f"wrote random HF folder in {time.time() - t:.0f} s", flush=True)
    size = sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf))
    results = {"hf_gb": round(size / 1e9, 2), "read_hf_s": read_time(hf)}
    py = sys.executable
    results["hf_to_megatron"] = measured([py, os.path.join(ROOT, "tools/convert/hf_to_megatron.py"), "--hf-dir", hf,
                                          "--out", ckpt, "--tp", str(args.tp), "--quiet"])
    results["read_ckpt_s"] = read_time(ckpt)
    write_random_adapter(run, ckpt)
    results["megatron_to_hf_merged"] = measured([py, os.path.join(ROOT, "tools/convert/megatron_to_hf.py"),
                                                 "--ckpt", run, "--out", out, "--quiet"])
    results["megatron_to_hf_adapter_only"] = measured([py, os.path.join(ROOT, "tools/convert/megatron_to_hf.py"),
                                                       "--ckpt", run, "--out", out + "_peft", "--adapter-only"])
    results["machine"] = f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    print(json.dumps(results, indent=2))
    if not args.keep:
        for d in (ckpt, run, out, out + "_peft"):
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
