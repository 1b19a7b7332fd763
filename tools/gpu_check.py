#!/usr/bin/env python
"""The GPU check: everything the CPU suite cannot show, in one run that writes one JSON
report (and a log) to --out. Made for a GPU machine lent rarely and briefly (one 10-minute
command): the machine's own python3 (torch preinstalled) plus the wheels ``make gpu-wheels``
gathers (``make gpu-check``). With --tiny it runs every unit at toy sizes on whatever device
there is, which is how the test suite keeps it from rotting.

Nothing measured is ever lost: the parent process only orchestrates; every heavy leg runs
in a process of its own (a CUDA fault or an out-of-memory in one cannot poison the rest),
writes each result the moment it exists, and the parent records it into the report at
once. A leg that fails or dies is recorded with its error beside the others' figures; a
process that dies mid-group is restarted for the units after the one it died in. Units run
in order of value and each is skipped, saying so, when the --budget-s left would not cover
its estimate (a running one is stopped at the budget).

Units, in order:
  wheels       every carried wheel's Requires-Dist against what this machine has
  throughput   training at the Llama-3-8B shape, seq 2048, rank 32 on q,k,v,up,down, TP=1 at
               world size 1 (the layout one GPU can run; TP>1 awaits a multi-GPU machine):
               lora, milora, lora with full recompute through the Trainer, and HF
               transformers + PEFT LoRA, each leg in its own process
  trainer      NCCL at world size 1 through the real Trainer on a tiny converted Llama in
               bf16: losses finite and falling, fp32 master factors and optimizer state, save,
               resume, the same losses after it (the first half is kept if resume fails)
  logits       megatron vs transformers logits for the same converted Llama (fp32, bf16)
  branch       PiSSA/MiLoRA branch residual mode: the bf16 output bit-identical at init
  sdpa         the attention kernel the trainer's call actually gets (on Hopper with a recent
               cuDNN: cuDNN attention, not flash), named from the profiler, against the math
               kernel; each explicit backend and the packed (explicit-mask) path timed too
  moe          one Qwen3-30B-A3B-shaped sparse layer (128 experts, 2048 -> 768, top-8): every
               expert adapter's init batched against one by one, and a MiLoRA training step at
               EP=1 against a dense layer of the same active parameters (benchmarks/bench_moe.py)
  init         subspace init at Llama-3-8B shapes (one layer's paper targets) against PEFT's
               fp32 SVD with the driver PEFT gets (the default), capped; precision vs float64

    python3 tools/gpu_check.py --out gpu_check_out            # on the GPU machine
    python tools/gpu_check.py --tiny --out /tmp/gpu_check     # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

from milora_megatron.mapping import PAPER_TARGETS  # noqa: E402

SECTIONS = ("wheels", "throughput", "trainer", "logits", "branch", "sdpa", "moe", "init")
LEGS = ("lora", "milora", "lora_full", "hf_peft")
# units run together in one process (a unit: a section, or "throughput.<leg>"), in order
GROUPS = [[f"throughput.{leg}"] for leg in LEGS] + [["trainer", "logits", "branch", "sdpa"], ["moe"], ["init"]]
# seconds each unit is expected to take on one H100/H200 (process start included): a unit
# is not started when less of the budget is left
ESTIMATE_S = {"throughput.lora": 100, "throughput.milora": 120, "throughput.lora_full": 100,
              "throughput.hf_peft": 100, "trainer": 40, "logits": 20, "branch": 20, "sdpa": 25, "moe": 90, "init": 100}
TINY_ESTIMATE_S = 5


class Report:
    """The JSON report, rewritten after every recorded result (a killed run keeps it all)."""

    def __init__(self, out: str, tiny: bool, budget_s: float):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "gpu_check.json")
        self.log = open(os.path.join(out, "gpu_check.log"), "a")
        self.data = {"tiny": tiny, "torch": torch.__version__, "device": device_name(), "budget_s": budget_s,
                     "sections": {}}
        self.start = time.time()

    def say(self, text: str) -> None:
        line = f"[{time.time() - self.start:7.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def record(self, unit: str, result: dict) -> None:
        """A section's result, or a throughput leg's ("throughput.<leg>") beside the others."""
        if unit.startswith("throughput."):
            section = self.data["sections"].setdefault("throughput", {"legs": {}})
            section["legs"][unit.split(".", 1)[1]] = result
            section.update(throughput_summary(section["legs"]))
        else:
            self.data["sections"][unit] = result
        self.data["elapsed_s"] = round(time.time() - self.start, 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, default=str)
        os.replace(tmp, self.path)
        brief = {k: v for k, v in result.items() if k not in ("ok", "seconds")}
        state = "skipped" if result.get("skipped") else ("ok" if result.get("ok") else "FAILED")
        self.say(f"{unit}: {state} in {result.get('seconds', 0)} s {json.dumps(brief, default=str)[:1500]}")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def on_gpu() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu() else None


def ensure_distributed():
    """A world-size-1 process group (NCCL on a GPU) and megatron's groups, for the sections
    that build megatron models directly; the trainer sets up the same through its config."""
    from milora_megatron.device import resolve_device
    from milora_megatron.train.parallel import init_distributed

    device = resolve_device("auto")
    init_distributed(device, tp=1, pp=1, seed=1234)
    return device


def free_memory() -> None:
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---- trainer -----------------------------------------------------------------------------
def tiny_llama(work: str) -> tuple[str, str]:
    """A tiny HF Llama (GQA, vocabulary not a multiple of 128) and its base checkpoint."""
    from milora_megatron.convert.importer import convert_hf_to_megatron
    from milora_megatron.models.tiny_hf import make_hf_model, make_tokenizer

    hf, ckpt = os.path.join(work, "hf"), os.path.join(work, "ckpt")
    if not os.path.exists(ckpt):
        make_hf_model(hf, tied=False, seed=5, vocab=300, layers=2, hidden=128, heads=4, kv_heads=2, ffn=256)
        make_tokenizer(hf, ["a tiny corpus for a tiny tokenizer"] * 20, vocab=300)
        convert_hf_to_megatron(hf, ckpt, tp=1, pp=1, progress=False)
    return hf, ckpt


def successor_data(n: int, seq_len: int, vocab: int, seed: int = 0):
    """Walks of a fixed random successor map (each token always followed by the same one)
    from random starts: a bigram task adapters learn in a few steps, so the loss must fall."""
    from milora_megatron.train.inputs import Data

    gen = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=gen)
    tokens = torch.empty(n, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for i in range(seq_len):
        tokens[:, i + 1] = successor[tokens[:, i]]
    return Data(train=(tokens, torch.ones(n, seq_len + 1)), valid=None, forgetting=None)


def section_trainer(work: str, tiny: bool, emit) -> dict:
    import torch.distributed as dist

    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.train.config import load_config
    from milora_megatron.train.loop import Trainer, setup

    _, ckpt = tiny_llama(work)
    steps = 8

    def trainer(out: str) -> Trainer:
        cfg = load_config(None, [
            f"model.load={ckpt}", f"output.dir={out}", "peft.method=milora", "peft.rank=8", "peft.dropout=0",
            f"train.iters={steps}", "train.lr=1e-2", "train.warmup=1", "train.seq_len=64", "train.global_batch=4",
            "train.micro_batch=2", "train.eval_every=0", "output.save_every=0",
            "output.tensorboard=false"])  # the GPU machine has no tensorboard package
        device, groups = setup(cfg)
        base = BaseCheckpoint(ckpt)
        return Trainer(cfg, groups, device, base=base, data=successor_data(64, 64, base.shape.vocab))

    straight = trainer(os.path.join(work, "run_straight"))
    straight.resume_or_start()
    losses = [straight.train_step()["loss"] for _ in range(steps)]
    factor_dtypes = sorted({str(p.dtype) for p in straight.params})
    state_dtypes = sorted({str(s["exp_avg"].dtype) for s in straight.optimizer.state.values()})
    result = {"backend": dist.get_backend(), "model_dtype": str(straight.dtype), "factor_dtypes": factor_dtypes,
              "optimizer_state_dtypes": state_dtypes, "losses": losses,
              "random_init_skipped": not straight.model.config.perform_initialization}
    emit(dict(result, ok=False, partial="the straight run; save and resume not finished"))  # kept if resume dies
    del straight
    resumed_dir = os.path.join(work, "run_resumed")
    first = trainer(resumed_dir)
    first.resume_or_start()
    for _ in range(steps // 2):
        first.train_step()
    first.save()
    del first
    second = trainer(resumed_dir)
    second.resume_or_start()
    resumed_at = second.step
    after = [second.train_step()["loss"] for _ in range(steps - resumed_at)]
    del second
    diff = max(abs(a - b) / abs(b) for a, b in zip(after, losses[resumed_at:]))
    result.update(resumed_at=resumed_at, resumed_losses=after, resume_max_rel_diff=diff)
    result["ok"] = bool(
        all(math.isfinite(x) for x in losses) and sum(losses[-3:]) < sum(losses[:3]) and factor_dtypes == ["torch.float32"]
        and state_dtypes == ["torch.float32"] and result["random_init_skipped"] and resumed_at == steps // 2 and diff <= (1e-3 if on_gpu() else 0.0)
        and (result["backend"] == "nccl") == on_gpu()
        and result["model_dtype"] == ("torch.bfloat16" if on_gpu() else "torch.float32"))
    return result


# ---- logits and branch mode ---------------------------------------------------------------
def _megatron_model(ckpt: str, dtype: torch.dtype):
    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.models.decoder import build_gpt, transformer_config

    base = BaseCheckpoint(ckpt)
    device = ensure_distributed()
    model = build_gpt(base.shape, transformer_config(base.shape, dtype=dtype, device=device,
                                                     perform_initialization=False)).to(device)
    base.load_into(model)
    return model.eval(), device


def _megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    from milora_megatron.models.decoder import gather_logits

    with torch.no_grad():
        pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        return gather_logits(model, model(tokens, pos, None)).float()


def section_logits(work: str, tiny: bool, emit) -> dict:
    from transformers import AutoModelForCausalLM

    hf, ckpt = tiny_llama(work)
    result = {"ok": True}
    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        model, device = _megatron_model(ckpt, dtype)
        ref = AutoModelForCausalLM.from_pretrained(hf, dtype=dtype).to(device).eval()
        tokens = torch.randint(0, model.decoder_shape.vocab, (2, 48), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            expected = ref(input_ids=tokens).logits.float()
        diff = (_megatron_logits(model, tokens) - expected).abs().max().item()
        scale = expected.abs().max().item()
        name = str(dtype).replace("torch.", "")
        result[name] = {"max_abs_diff": diff, "max_abs_logit": scale, "bound": bound}
        result["ok"] &= diff <= bound
        del model, ref
    return result


def section_branch(work: str, tiny: bool, emit) -> dict:
    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.adapters.apply import apply_adapters

    _, ckpt = tiny_llama(work)
    result = {"ok": True}
    for method in ("pissa", "milora"):
        model, device = _megatron_model(ckpt, torch.bfloat16)
        tokens = torch.randint(0, model.decoder_shape.vocab, (2, 48), generator=torch.Generator().manual_seed(2)).to(device)
        before = _megatron_logits(model, tokens)
        apply_adapters(model, AdapterConfig(method=method, rank=8, residual="branch", targets=list(PAPER_TARGETS)))
        after = _megatron_logits(model, tokens)
        result[method] = {"bit_identical": torch.equal(before, after), "max_abs_diff": (after - before).abs().max().item()}
        result["ok"] &= result[method]["bit_identical"]
        del model
    return result


# ---- attention kernel ---------------------------------------------------------------------
def _kernel_names(fn) -> list[str]:
    """The attention kernels (device kernels on a GPU, aten ops on the CPU) ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu() else [])
    with profile(activities=activities) as prof:
        fn()
        sync()
    words = ("flash", "cudnn", "efficient", "fmha", "attention", "sdpa", "attn")
    return sorted({e.key for e in prof.key_averages() if any(w in e.key.lower() for w in words)})[:12]


def _kernel_kind(names: list[str]) -> str:
    text = " ".join(names).lower()
    for kind, marks in (("cudnn", ("cudnn",)), ("flash", ("flash",)), ("efficient", ("efficient", "fmha", "cutlass")),
                        ("math", ("math",))):
        if any(m in text for m in marks):
            return kind
    return "unknown"


def section_sdpa(work: str, tiny: bool, emit) -> dict:
    """The trainer's own call (models/layers.py: SDPA with is_causal and enable_gqa, no backend
    forced), the kernel it gets, and every explicit backend, against the math kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, heads, groups, seq, dim = (2, 4, 2, 64, 32) if tiny else (2, 32, 8, 2048, 128)
    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    gen = torch.Generator(device=device).manual_seed(3)
    q = torch.randn(b, heads, seq, dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(b, groups, seq, dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(b, groups, seq, dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    causal_mask = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()  # packed batches pass a mask
    result = {"shape": {"batch": b, "heads": heads, "kv_heads": groups, "seq": seq, "head_dim": dim},
              "dtype": str(dtype), "ok": True}

    def once(mask=None):
        q.grad = k.grad = v.grad = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        out.float().square().mean().backward()
        return out

    def timed(backend=None, mask=None) -> tuple[torch.Tensor, float]:
        times, out = [], None
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                out = once(mask)
            sync()
            times.append(time.perf_counter() - t0)
        return out.detach().float(), min(times[1:])

    def against(out, reference) -> float:
        return ((out - reference).norm() / reference.norm()).item()

    reference, math_s = timed(SDPBackend.MATH)
    result["math_fwd_bwd_s"] = math_s
    out, seconds = timed()
    names = _kernel_names(once)
    rel = against(out, reference)
    result["trainer_call"] = {"kernels": names, "kind": _kernel_kind(names), "fwd_bwd_s": seconds,
                              "rel_diff_vs_math": rel, "speedup_vs_math": math_s / seconds}
    result["ok"] &= rel <= 2e-2
    out, seconds = timed(mask=causal_mask)
    names = _kernel_names(lambda: once(causal_mask))
    result["packed_call"] = {"kernels": names, "kind": _kernel_kind(names), "fwd_bwd_s": seconds,
                             "rel_diff_vs_math": against(out, reference)}
    result["ok"] &= result["packed_call"]["rel_diff_vs_math"] <= 2e-2
    emit(dict(result))
    if on_gpu():
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                out, seconds = timed(backend)
            except RuntimeError as exc:  # this kernel refuses these arguments on this GPU
                result[backend.name.lower()] = {"available": False, "error": str(exc)[:300]}
                continue
            result[backend.name.lower()] = {"available": True, "fwd_bwd_s": seconds,
                                            "rel_diff_vs_math": against(out, reference)}
    return result


# ---- subspace init ------------------------------------------------------------------------
def section_init(work: str, tiny: bool, emit) -> dict:
    """Our init of one layer's paper targets against PEFT's: ``torch.linalg.svd(W.float(),
    full_matrices=False)`` with the default driver, as PEFT's pissa init calls it. That SVD
    takes ~1 s per 4096-wide matrix on an H100, so it is timed until ``svd_cap_s`` and the
    rest of the layer is estimated from the time per element (said so in the result)."""
    from bench_subspace_init import LLAMA3_8B, precision

    from milora_megatron.subspace import ShardedWeight, extract_subspaces

    device = "cuda" if on_gpu() else "cpu"
    shapes = {k: (o // 16, i // 16, d) for k, (o, i, d) in LLAMA3_8B.items()} if tiny else LLAMA3_8B
    rank, svd_cap_s = (8, 5.0) if tiny else (32, 20.0)
    rows, svd_spent = [], 0.0
    for i, (name, (out, inp, shard_dim)) in enumerate(shapes.items()):
        w = (torch.randn(out, inp, generator=torch.Generator().manual_seed(i)) * 0.02).to(torch.bfloat16).to(device)
        sync()
        t0 = time.perf_counter()
        extract_subspaces([ShardedWeight(name, w, shard_dim)], rank, "minor")
        sync()
        row = {"matrix": f"{name} {out}x{inp}", "ours_s": time.perf_counter() - t0}
        if svd_spent < svd_cap_s:
            t0 = time.perf_counter()
            u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)
            _ = (u[:, -rank:], sv[-rank:], vh[-rank:])
            sync()
            row["peft_fp32_svd_s"] = time.perf_counter() - t0
            svd_spent += row["peft_fp32_svd_s"]
        rows.append(row)
        del w
    measured = [r for r in rows if "peft_fp32_svd_s" in r]
    per_element = sum(r["peft_fp32_svd_s"] for r in measured) / sum(
        math.prod(shapes[r["matrix"].split()[0]][:2]) for r in measured)
    for r in rows:
        if "peft_fp32_svd_s" not in r:
            r["peft_fp32_svd_s_estimated"] = per_element * math.prod(shapes[r["matrix"].split()[0]][:2])
    ours = sum(r["ours_s"] for r in rows)
    peft = sum(r.get("peft_fp32_svd_s", r.get("peft_fp32_svd_s_estimated", 0.0)) for r in rows)
    result = {"device": device, "rank": rank, "svd_driver": "default (driver=None), as PEFT calls it",
              "svd_cap_s": svd_cap_s, "svd_estimated_for": [r["matrix"] for r in rows if "peft_fp32_svd_s" not in r],
              "per_matrix": rows, "one_layer_ours_s": ours, "one_layer_peft_s": peft, "speedup": peft / ours,
              "whole_model_estimate_ours_s": 32 * ours, "whole_model_estimate_peft_s": 32 * peft, "ok": True}
    emit(dict(result))  # the timings are kept if the precision part fails
    size = 128 if tiny else 2048
    rows_p = precision(size, rank, 1e4, device)
    result.update(precision_size=size, precision_cond=1e4,
                  precision=[{"input": d, "method": m, "sigma_rel_err": e, "sin_theta_u": su, "orth_err": o}
                             for d, m, e, su, o in rows_p])
    ours_err = max(r["sigma_rel_err"] for r in result["precision"] if r["method"].startswith("ours"))
    result["ok"] = ours_err <= 1e-8
    return result


def section_moe(work: str, tiny: bool, emit) -> dict:
    """A Qwen3-30B-A3B-shaped sparse layer: the expert adapters' init (all at once, batched,
    and one call per matrix; they must agree) and a training step against a dense layer of
    the same active parameters (the real Trainer at EP=1, random weights)."""
    import types

    from bench_moe import QWEN3_30B_A3B, expert_weights, time_init, time_step

    device = "cuda" if on_gpu() else "cpu"
    shape = dict(QWEN3_30B_A3B, hidden=128, heads=4, kv_heads=2, head_dim=32, moe_ffn=48, experts=8, topk=2) \
        if tiny else QWEN3_30B_A3B
    rank = 8 if tiny else 32
    init = time_init(expert_weights(shape["experts"], shape["hidden"], shape["moe_ffn"], device), rank, device)
    result = {"device": device, "shape": shape, "rank": rank, "init": init, "ok": init["sigma_rel_diff"] <= 1e-6}
    emit(dict(result))  # the init figures are kept if the step fails
    args = types.SimpleNamespace(experts=shape["experts"], rank=rank, seq_len=64 if tiny else 2048,
                                 global_batch=2 if tiny else 4, steps=1 if tiny else 3, warmup_steps=1)
    rows = [time_step(sparse, args, shape) for sparse in (False, True)]
    result.update(step={r["layer"]: {k: v for k, v in r.items() if k != "layer"} for r in rows},
                  sparse_over_dense=rows[1]["step_s"] / rows[0]["step_s"], seq_len=args.seq_len,
                  global_batch=args.global_batch)
    return result


# ---- throughput ---------------------------------------------------------------------------
def _throughput_setup(tiny: bool):
    from bench_train_throughput import LLAMA3_8B, SMALL

    from milora_megatron.models.decoder import DecoderShape

    dims = dict(SMALL, layers=2, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=512) if tiny else dict(LLAMA3_8B)
    args = {"rank": 8 if tiny else 32, "targets": list(PAPER_TARGETS), "dropout": 0.05, "residual": "branch",
            "seq_len": 64 if tiny else 2048, "global_batch": 4 if tiny else 16, "micro_batch": 2,
            "tp": 1, "pp": 1, "sp": False, "steps": 2 if tiny else 3, "warmup_steps": 1 if tiny else 2}
    return dims, DecoderShape(**dims), args


def _hf_peft_leg(shape, args: dict) -> dict:
    """HF transformers + PEFT LoRA on the same shape, micro-batch and global batch."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device("cuda") if on_gpu() else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                      max_position_embeddings=shape.max_seq, rope_theta=shape.rope_theta, attn_implementation="sdpa")
    with torch.device(device):  # initialised on the GPU, in bf16 (an 8B fp32 init on the CPU takes minutes)
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=args["rank"], lora_alpha=2 * args["rank"], lora_dropout=args["dropout"],
                                             target_modules=args["targets"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, fused=on_gpu())
    seq, mb, gb = args["seq_len"], args["micro_batch"], args["global_batch"]
    gen = torch.Generator().manual_seed(0)
    times = []
    model.train()
    for step in range(args["warmup_steps"] + args["steps"]):
        sync()
        t0 = time.perf_counter()
        for _ in range(gb // mb):
            ids = torch.randint(3, shape.vocab, (mb, seq), generator=gen).to(device)
            (model(input_ids=ids, labels=ids).loss / (gb // mb)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= args["warmup_steps"]:
            times.append(time.perf_counter() - t0)
    step_s = statistics.mean(times)
    return {"method": "hf+peft lora", "step_s": step_s, "step_s_sd": statistics.stdev(times) if len(times) > 1 else 0.0,
            "tokens_per_s": gb * seq / step_s, "peak_mem_gib": peak_gib(),
            "trainable_params": sum(p.numel() for p in params)}


def throughput_leg(leg: str, work: str, tiny: bool) -> dict:
    """One leg: lora / milora as trained by default, lora with full recompute (the memory /
    speed trade that decides train.recompute's default on a GPU), or HF + PEFT."""
    from bench_train_throughput import bench_method

    dims, shape, args = _throughput_setup(tiny)
    free_memory()
    if leg == "hf_peft":
        result = _hf_peft_leg(shape, args)
    else:
        method, recompute = {"lora": ("lora", "none"), "milora": ("milora", "none"),
                             "lora_full": ("lora", "full")}[leg]
        result = bench_method(method, argparse.Namespace(**args, recompute=recompute), shape, work)
    result.update(ok=math.isfinite(result["step_s"]), shape=dims,
                  settings={k: v for k, v in args.items() if k != "targets"})
    return result


def throughput_summary(legs: dict) -> dict:
    """Ratios and goals from the legs measured so far (the goals are reported, not asserted)."""
    ok = {name: leg for name, leg in legs.items() if leg.get("ok")}
    out = {"ok": bool(ok) and len(ok) == len(legs) and not any(leg.get("skipped") for leg in legs.values())}
    lora, milora, hf = ok.get("lora"), ok.get("milora"), ok.get("hf_peft")
    goals = {}
    if lora:
        goals["tokens_per_s>=14000"] = lora["tokens_per_s"] >= 14000
    if lora and milora:
        out["milora_step_over_lora"] = milora["step_s"] / lora["step_s"]
        goals["milora<=1.05x_lora"] = out["milora_step_over_lora"] <= 1.05
    if lora and hf:
        out["lora_tokens_per_s_over_hf_peft"] = lora["tokens_per_s"] / hf["tokens_per_s"]
        goals["peak_below_hf_peft"] = (lora["peak_mem_gib"] or 0) < (hf["peak_mem_gib"] or 0)
    out["goals"] = goals
    return out


# ---- carried wheels -----------------------------------------------------------------------
def check_wheels(folder: str) -> dict:
    """Every wheel in ``folder`` against this interpreter: each Requires-Dist that applies here
    (its marker true, no extra) met by an installed distribution (or by another carried
    wheel), and the wheel's Requires-Python. A wheel that downloads can still not work."""
    import importlib.metadata as md

    try:
        from packaging.requirements import Requirement
        from packaging.specifiers import SpecifierSet
        from packaging.utils import canonicalize_name
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.specifiers import SpecifierSet
        from pip._vendor.packaging.utils import canonicalize_name

    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        return {"ok": True, "skipped": f"no wheels in {folder}"}
    carried, metas = {}, {}
    for path in wheels:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(name).decode()
        fields = [line.split(": ", 1) for line in text.splitlines() if ": " in line and not line.startswith(" ")]
        meta = {}
        for key, value in fields:
            meta.setdefault(key, []).append(value)
        carried[canonicalize_name(meta["Name"][0])] = meta["Version"][0]
        metas[os.path.basename(path)] = meta
    problems, report = [], {}
    python = ".".join(map(str, sys.version_info[:3]))
    for wheel, meta in metas.items():
        unmet = []
        for spec in meta.get("Requires-Python", []):
            if python not in SpecifierSet(spec):
                unmet.append(f"Requires-Python {spec} (this is {python})")
        for line in meta.get("Requires-Dist", []):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            have = carried.get(name)
            if have is None:
                try:
                    have = md.version(req.name)
                except md.PackageNotFoundError:
                    unmet.append(f"{req} (not installed)")
                    continue
            if req.specifier and have not in req.specifier:
                unmet.append(f"{req} (installed {have})")
        report[wheel] = {"unmet": unmet}
        problems += [f"{wheel}: {u}" for u in unmet]
    return {"ok": not problems, "wheels": report, "problems": problems}


# ---- orchestration ------------------------------------------------------------------------
RUNNERS = {"trainer": section_trainer, "logits": section_logits, "branch": section_branch, "sdpa": section_sdpa,
           "moe": section_moe, "init": section_init}


def run_units(units: list[str], results_path: str, work: str, tiny: bool, fail: str | None) -> None:
    """The child: each unit in turn, every result (and partial result) appended to
    ``results_path`` the moment it exists; an exception is that unit's result."""

    def write(unit: str, result: dict) -> None:
        with open(results_path, "a") as f:
            f.write(json.dumps({"unit": unit, "result": result}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for unit in units:
        t0 = time.time()
        if unit == fail:  # the suite's stand-in for a CUDA fault: the process dies here
            print(f"{unit}: injected failure (--fail): the process exits", file=sys.stderr, flush=True)
            os._exit(3)
        try:
            if unit.startswith("throughput."):
                result = throughput_leg(unit.split(".", 1)[1], work, tiny)
            else:
                # what a unit emits before it ends is partial: recorded only if its process dies
                result = RUNNERS[unit](work, tiny, lambda partial, u=unit: write(u, dict(
                    partial, partial=partial.get("partial", True), seconds=round(time.time() - t0, 1))))
        except Exception:
            result = {"ok": False, "error": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.time() - t0, 1)
        write(unit, result)
        free_memory()


def _read_results(path: str) -> dict:
    found = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by the process's death
                    continue
                found[entry["unit"]] = entry["result"]
    return found


def run_group(units: list[str], report: Report, args, work: str, deadline: float) -> None:
    """``units`` in child processes: each result recorded as it arrives; a unit whose process
    died is recorded with the death (and its partial result), the rest run in a new one."""
    pending = list(units)
    while pending:
        estimate = TINY_ESTIMATE_S if args.tiny else ESTIMATE_S[pending[0]]
        left = deadline - time.time()
        if left < estimate:
            for unit in pending:
                report.record(unit, {"ok": False, "skipped": f"not started: {max(left, 0):.0f} s of --budget-s "
                                     f"{args.budget_s:.0f} left, it needs about {ESTIMATE_S[unit]} s on a GPU"})
            return
        results = os.path.join(work, f"results-{len(os.listdir(work))}.jsonl")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", ",".join(pending), "--results", results,
               "--work", work, "--out", args.out] + (["--tiny"] if args.tiny else []) + \
              (["--fail", args.fail] if args.fail else [])
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen, output, timed_out = set(), [], False
        while True:  # record each result the moment it is written
            try:
                out, _ = proc.communicate(timeout=2)
                output.append(out)
                break
            except subprocess.TimeoutExpired:
                if time.time() > deadline:
                    proc.kill()
                    output.append(proc.communicate()[0])
                    timed_out = True
                    break
            for unit, result in _read_results(results).items():
                if unit not in seen and not result.get("partial"):
                    seen.add(unit)
                    report.record(unit, result)
        found = _read_results(results)
        for unit in pending:
            if unit in found and not found[unit].get("partial") and unit not in seen:
                report.record(unit, found[unit])
        done = [u for u in pending if u in found and not found[u].get("partial")]
        rest = [u for u in pending if u not in done]
        if not rest:
            return
        died, pending = rest[0], rest[1:]
        tail = "".join(output)[-2000:]
        why = (f"stopped at the budget ({args.budget_s:.0f} s)" if timed_out else
               f"its process died (exit code {proc.returncode})")
        result = dict(found.get(died, {}), ok=False, error=f"{why}; output tail:\n{tail}",
                      seconds=round(time.time() - t0, 1))
        report.record(died, result)
        if timed_out:
            for unit in pending:
                report.record(unit, {"ok": False, "skipped": "not started: the budget ran out"})
            return


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.log")
    p.add_argument("--tiny", action="store_true", help="toy sizes for every unit (the test suite's run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock budget (default 480: inside one 10-minute device command with the "
                        "machine's start); a unit whose estimate does not fit what is left is skipped, saying so, "
                        "and a running one is stopped at the budget")
    p.add_argument("--wheels", default=os.path.join(ROOT, ".whl"), help="the carried wheels to check (make gpu-wheels)")
    p.add_argument("--fail", default=None, help=argparse.SUPPRESS)  # tests: this unit's process dies
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run_units(args.child.split(","), args.results, args.work, args.tiny, args.fail)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        return 0
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    report = Report(args.out, args.tiny, args.budget_s)
    deadline = report.start + args.budget_s
    report.say(f"gpu check on {report.data['device']}, torch {torch.__version__}, sections {', '.join(sections)}, "
               f"budget {args.budget_s:.0f} s")
    if "wheels" in sections:
        report.record("wheels", check_wheels(args.wheels))
    with tempfile.TemporaryDirectory() as work:
        for group in GROUPS:
            units = [u for u in group if u.split(".")[0] in sections]
            if units:
                run_group(units, report, args, work, deadline)
    failed = [n for n, r in report.data["sections"].items() if not r.get("ok")]
    report.say(f"done in {time.time() - report.start:.0f} s; report {report.path}; "
               f"{'all sections ok' if not failed else 'not ok: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
