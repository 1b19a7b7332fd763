#!/usr/bin/env python
"""The GPU check: everything the CPU suite cannot show, in one run that writes one JSON
report (and a log) to --out. Made for a GPU machine lent rarely and briefly: the machine's
own python3 (torch preinstalled) plus the wheels ``make gpu-wheels`` gathers; under 8
minutes on one H100 (``make gpu-check``). With --tiny it runs every section at toy sizes
on whatever device there is, which is how the test suite keeps it from rotting.

Sections (each recorded as it finishes, a failure recorded and the next one run):
  trainer     NCCL (gloo on CPU) at world size 1 through the real Trainer on a tiny
              converted Llama in the GPU's dtype (bf16): losses finite and falling, fp32
              master factors and optimizer state, save, resume, the same losses after it
  logits      megatron vs transformers logits for the same converted Llama (fp32, bf16)
  branch      PiSSA/MiLoRA branch residual mode: the bf16 output bit-identical at init
  sdpa        SDPA's flash kernel at the Llama-3-8B attention shape (GQA, causal), against
              the math kernel, forward + backward time
  init        subspace init at Llama-3-8B shapes (one layer's paper targets) against a
              PEFT-style fp32 SVD in the same run; precision of both against float64
  throughput  training at the Llama-3-8B shape, seq 2048, rank 32 on q,k,v,up,down:
              lora and milora through the Trainer, and HF transformers + PEFT LoRA in the
              same process (tokens/s, step time, peak GiB)

    python3 tools/gpu_check.py --out gpu_check_out            # on the GPU machine
    python tools/gpu_check.py --tiny --out /tmp/gpu_check     # anywhere, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

from milora_megatron.mapping import PAPER_TARGETS  # noqa: E402

SECTIONS = ("trainer", "logits", "branch", "sdpa", "init", "throughput")


class Report:
    """The JSON report, rewritten after every section (a killed run keeps what it finished)."""

    def __init__(self, out: str, tiny: bool):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "gpu_check.json")
        self.log = open(os.path.join(out, "gpu_check.log"), "a")
        self.data = {"tiny": tiny, "torch": torch.__version__, "device": device_name(), "sections": {}}
        self.start = time.time()

    def say(self, text: str) -> None:
        line = f"[{time.time() - self.start:7.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def record(self, name: str, result: dict) -> None:
        self.data["sections"][name] = result
        self.data["elapsed_s"] = round(time.time() - self.start, 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, default=str)
        os.replace(tmp, self.path)


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
    from milora_megatron.models.tiny_hf import make_hf_llama, make_tokenizer

    hf, ckpt = os.path.join(work, "hf"), os.path.join(work, "ckpt")
    if not os.path.exists(ckpt):
        make_hf_llama(hf, tied=False, seed=5, vocab=300, layers=2, hidden=128, heads=4, kv_heads=2, ffn=256)
        make_tokenizer(hf, ["a tiny corpus for a tiny tokenizer"] * 20, vocab=300)
        convert_hf_to_megatron(hf, ckpt, tp=1, pp=1, progress=False)
    return hf, ckpt


def successor_data(n: int, seq_len: int, vocab: int, seed: int = 0):
    """Walks of a fixed random successor map (each token always followed by the same one)
    from random starts: a bigram task adapters learn in a few steps, so the loss must fall."""
    from milora_megatron.train.loop import Data

    gen = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=gen)
    tokens = torch.empty(n, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for i in range(seq_len):
        tokens[:, i + 1] = successor[tokens[:, i]]
    return Data(train=(tokens, torch.ones(n, seq_len + 1)), valid=None, forgetting=None)


def section_trainer(work: str, tiny: bool) -> dict:
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
    from milora_megatron.models.llama import build_gpt, transformer_config

    base = BaseCheckpoint(ckpt)
    device = ensure_distributed()
    model = build_gpt(base.shape, transformer_config(base.shape, dtype=dtype, device=device,
                                                     perform_initialization=False)).to(device)
    base.load_into(model)
    return model.eval(), device


def _megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    from milora_megatron.models.llama import gather_logits

    with torch.no_grad():
        pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        return gather_logits(model, model(tokens, pos, None)).float()


def section_logits(work: str, tiny: bool) -> dict:
    from transformers import AutoModelForCausalLM

    hf, ckpt = tiny_llama(work)
    result = {"ok": True}
    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        model, device = _megatron_model(ckpt, dtype)
        ref = AutoModelForCausalLM.from_pretrained(hf, dtype=dtype).to(device).eval()
        tokens = torch.randint(0, model.llama_shape.vocab, (2, 48), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            expected = ref(input_ids=tokens).logits.float()
        diff = (_megatron_logits(model, tokens) - expected).abs().max().item()
        scale = expected.abs().max().item()
        name = str(dtype).replace("torch.", "")
        result[name] = {"max_abs_diff": diff, "max_abs_logit": scale, "bound": bound}
        result["ok"] &= diff <= bound
        del model, ref
    return result


def section_branch(work: str, tiny: bool) -> dict:
    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.adapters.apply import apply_adapters

    _, ckpt = tiny_llama(work)
    result = {"ok": True}
    for method in ("pissa", "milora"):
        model, device = _megatron_model(ckpt, torch.bfloat16)
        tokens = torch.randint(0, model.llama_shape.vocab, (2, 48), generator=torch.Generator().manual_seed(2)).to(device)
        before = _megatron_logits(model, tokens)
        apply_adapters(model, AdapterConfig(method=method, rank=8, residual="branch", targets=list(PAPER_TARGETS)))
        after = _megatron_logits(model, tokens)
        result[method] = {"bit_identical": torch.equal(before, after), "max_abs_diff": (after - before).abs().max().item()}
        result["ok"] &= result[method]["bit_identical"]
        del model
    return result


# ---- attention kernel ---------------------------------------------------------------------
def section_sdpa(work: str, tiny: bool) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, heads, groups, seq, dim = (2, 4, 2, 64, 32) if tiny else (2, 32, 8, 2048, 128)
    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    gen = torch.Generator(device=device).manual_seed(3)
    q = torch.randn(b, heads, seq, dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(b, groups, seq, dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(b, groups, seq, dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    backends = [SDPBackend.FLASH_ATTENTION] if on_gpu() else []
    result = {"shape": {"batch": b, "heads": heads, "kv_heads": groups, "seq": seq, "head_dim": dim},
              "dtype": str(dtype), "ok": True}

    def run(backend) -> tuple[torch.Tensor, float]:
        times, out = [], None
        for _ in range(3):
            q.grad = k.grad = v.grad = None
            sync()
            t0 = time.perf_counter()
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                out.float().square().mean().backward()
            sync()
            times.append(time.perf_counter() - t0)
        return out.detach().float(), min(times[1:])

    reference, math_s = run(SDPBackend.MATH)
    result["math_fwd_bwd_s"] = math_s
    for backend in backends:
        name = backend.name.lower()
        try:
            out, seconds = run(backend)
        except RuntimeError as exc:  # the kernel refused these arguments
            result[name] = {"available": False, "error": str(exc)[:500]}
            result["ok"] = False
            continue
        rel = ((out - reference).norm() / reference.norm()).item()
        result[name] = {"available": True, "fwd_bwd_s": seconds, "rel_diff_vs_math": rel}
        result["ok"] &= rel <= 2e-2
    return result


# ---- subspace init ------------------------------------------------------------------------
def section_init(work: str, tiny: bool) -> dict:
    from bench_subspace_init import LLAMA3_8B, precision, time_init

    device = "cuda" if on_gpu() else "cpu"
    shapes = {k: (o // 16, i // 16, s) for k, (o, i, s) in LLAMA3_8B.items()} if tiny else LLAMA3_8B
    rank = 8 if tiny else 32
    rows = time_init(shapes, rank, device)
    ours, peft = sum(r[1] for r in rows), sum(r[2] for r in rows)
    size = 128 if tiny else 2048
    rows_p = precision(size, rank, 1e4, device)
    result = {"device": device, "rank": rank,
              "per_matrix": [{"matrix": n, "ours_s": a, "peft_fp32_svd_s": b} for n, a, b in rows],
              "one_layer_ours_s": ours, "one_layer_peft_s": peft, "speedup": peft / ours,
              "whole_model_estimate_ours_s": 32 * ours, "whole_model_estimate_peft_s": 32 * peft,
              "precision_size": size, "precision_cond": 1e4,
              "precision": [{"input": d, "method": m, "sigma_rel_err": e, "sin_theta_u": su, "orth_err": o}
                            for d, m, e, su, o in rows_p]}
    ours_err = max(r["sigma_rel_err"] for r in result["precision"] if r["method"].startswith("ours"))
    result["ok"] = ours_err <= 1e-8
    return result


# ---- throughput ---------------------------------------------------------------------------
def _trainer_leg(method: str, shape, args: dict, work: str) -> dict:
    from bench_train_throughput import bench_method

    ns = argparse.Namespace(**args)
    return bench_method(method, ns, shape, work)


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
    result = {"method": "hf+peft lora", "step_s": step_s, "step_s_sd": statistics.stdev(times) if len(times) > 1 else 0.0,
              "tokens_per_s": gb * seq / step_s, "peak_mem_gib": peak_gib(),
              "trainable_params": sum(p.numel() for p in params)}
    del model, opt, params
    return result


def section_throughput(work: str, tiny: bool) -> dict:
    from bench_train_throughput import LLAMA3_8B, SMALL

    from milora_megatron.models.llama import LlamaShape

    dims = dict(SMALL, layers=2, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=512) if tiny else dict(LLAMA3_8B)
    shape = LlamaShape(**dims)
    args = {"rank": 8 if tiny else 32, "targets": list(PAPER_TARGETS), "dropout": 0.05, "residual": "branch",
            "seq_len": 64 if tiny else 2048, "global_batch": 4 if tiny else 16, "micro_batch": 2,
            "tp": 1, "pp": 1, "sp": False, "steps": 2 if tiny else 3, "warmup_steps": 1 if tiny else 2}
    legs = []
    # lora and milora as trained by default, then lora with full recompute: the memory /
    # speed trade that decides train.recompute's default on a GPU
    for method, recompute in (("lora", "none"), ("milora", "none"), ("lora", "full")):
        free_memory()
        legs.append(_trainer_leg(method, shape, {**args, "recompute": recompute}, work))
    free_memory()
    legs.append(_hf_peft_leg(shape, args))
    free_memory()
    lora = legs[0]
    hf = legs[-1]
    result = {"shape": dims, "settings": {k: v for k, v in args.items() if k != "targets"}, "legs": legs,
              "milora_step_over_lora": legs[1]["step_s"] / lora["step_s"],
              "lora_tokens_per_s_over_hf_peft": lora["tokens_per_s"] / hf["tokens_per_s"]}
    result["goals"] = {"tokens_per_s>=14000": lora["tokens_per_s"] >= 14000,
                       "milora<=1.05x_lora": result["milora_step_over_lora"] <= 1.05,
                       "peak_below_hf_peft": (lora["peak_mem_gib"] or 0) < (hf["peak_mem_gib"] or 0)}
    result["ok"] = all(math.isfinite(leg["step_s"]) for leg in legs)  # the goals are reported, not asserted
    return result


RUNNERS = {"trainer": section_trainer, "logits": section_logits, "branch": section_branch, "sdpa": section_sdpa,
           "init": section_init, "throughput": section_throughput}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.log")
    p.add_argument("--tiny", action="store_true", help="toy sizes for every section (the test suite's run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = Report(args.out, args.tiny)
    report.say(f"gpu check on {report.data['device']}, torch {torch.__version__}, sections {', '.join(sections)}")
    with tempfile.TemporaryDirectory() as work:
        for name in sections:
            t0 = time.time()
            try:
                result = RUNNERS[name](work, args.tiny)
            except Exception:
                result = {"ok": False, "error": traceback.format_exc()[-3000:]}
            result["seconds"] = round(time.time() - t0, 1)
            report.record(name, result)
            report.say(f"{name}: {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s "
                       f"{json.dumps({k: v for k, v in result.items() if k not in ('ok', 'seconds')}, default=str)[:1500]}")
            free_memory()
    failed = [n for n, r in report.data["sections"].items() if not r.get("ok")]
    report.say(f"done in {time.time() - report.start:.0f} s; report {report.path}; "
               f"{'all sections ok' if not failed else 'FAILED: ' + ', '.join(failed)}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
