#!/usr/bin/env python
"""The whole user path on a tiny Llama, on CPU with gloo, in a few minutes:

  1. build a tiny Llama in HF format locally (random weights, a byte-level BPE tokenizer
     trained on the demo data; nothing is downloaded)
  2. tools/convert/hf_to_megatron.py --tp 2
  3. torchrun --nproc_per_node 2 launch/pretrain_milora.py --config configs/tiny_cpu.yaml ...
  4. tools/convert/megatron_to_hf.py (merged) and --adapter-only (PEFT)
  5. load the merged model with transformers and generate; apply the PEFT adapter to the
     original model and check it gives the merged model's logits
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "data", "demo")


def step(title: str, cmd: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    # a CPU demo (gloo), GPU or not: the config pins model.device=cpu and GPUs are hidden
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "demo"), help="folder for everything the demo writes")
    from milora_megatron.adapters.variants import available

    p.add_argument("--method", default="milora", choices=available(), help="adapter method")
    p.add_argument("--iters", type=int, default=30, help="training steps")
    p.add_argument("--data", default="alpaca", choices=("alpaca", "chat"),
                   help="training data format: alpaca records (data.template=alpaca), or the same examples as "
                        "multi-turn conversations (data.template=chat, rendered with the tokenizer's chat template)")
    args = p.parse_args()
    start = time.time()
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    hf, ckpt, run = (os.path.join(work, n) for n in ("hf_tiny_llama", "megatron_ckpt", "run"))
    merged, peft = os.path.join(work, "hf_merged"), os.path.join(work, "peft_adapter")

    print("=== 1. tiny Llama in HF format (random weights, locally trained tokenizer)", flush=True)
    from milora_megatron.models.tiny_hf import make_hf_model, make_tokenizer

    texts = [line for line in open(os.path.join(DATA, "instructions.jsonl"))] + [open(os.path.join(DATA, "general.txt")).read()]
    from milora_megatron.data import PREAMBLE, PREAMBLE_INPUT, instruction_prompt

    make_hf_model(hf, tied=False, seed=0, layers=4, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=1024,
                  max_shard_size="2MB")
    make_tokenizer(hf, texts + [PREAMBLE, PREAMBLE_INPUT] * 20, vocab=1024)

    train, valid, template = f"{DATA}/instructions.jsonl", f"{DATA}/valid.jsonl", "alpaca"
    if args.data == "chat":
        train, valid, template = (_as_chat(train, os.path.join(work, "chat_train.jsonl")),
                                  _as_chat(valid, os.path.join(work, "chat_valid.jsonl")), "chat")
    py = sys.executable
    step("2. HF -> megatron (TP=2)", [py, os.path.join(ROOT, "tools/convert/hf_to_megatron.py"), "--hf-dir", hf,
                                      "--out", ckpt, "--tp", "2"])
    step(f"3. train {args.method} (torchrun, 2 ranks, TP=2)", [
        py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(ROOT, "launch/pretrain_milora.py"), "--config", os.path.join(ROOT, "configs/tiny_cpu.yaml"),
        f"model.load={ckpt}", f"data.train={train}", f"data.valid={valid}", f"data.template={template}",
        f"data.forgetting={DATA}/general.txt", f"output.dir={run}", f"peft.method={args.method}",
        f"train.iters={args.iters}"])
    step("4a. export merged HF model", [py, os.path.join(ROOT, "tools/convert/megatron_to_hf.py"), "--ckpt", run,
                                        "--out", merged, "--quiet"])
    step("4b. export PEFT adapter", [py, os.path.join(ROOT, "tools/convert/megatron_to_hf.py"), "--ckpt", run,
                                     "--out", peft, "--adapter-only"])

    print("\n=== 5. load with transformers and generate", flush=True)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    if args.data == "chat":
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 7?"}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    else:
        ids = tok(instruction_prompt("What is 12 plus 7?"), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        tuned = model(**ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf), peft).eval()
        diff = (peft_model(**ids).logits - tuned).abs().max().item()
    print(f"prompt: 'What is 12 plus 7?'  ->  generated: {tok.decode(out[0, ids['input_ids'].shape[1]:])!r}")
    print(f"PEFT adapter on the original model vs merged model: max |logit diff| = {diff:.2e}")
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m for m in metrics if m.get("event") == "eval"]
    print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; last eval: "
          f"{ {k: round(v, 4) for k, v in evals[-1].items() if k.endswith('loss')} if evals else 'none'}")
    print(f"\nEverything is under {work}:\n  HF source      {hf}\n  megatron ckpt  {ckpt}\n  run folder     {run} "
          f"(metrics.jsonl, checkpoints/)\n  merged HF      {merged}\n  PEFT adapter   {peft}\n"
          f"demo finished in {time.time() - start:.0f} s")
    return 0


def _as_chat(path: str, out: str) -> str:
    """The alpaca records of ``path`` as conversations: a system turn, then two instructions
    and their answers (multi-turn: both assistant turns are trained on)."""
    records = [json.loads(line) for line in open(path) if line.strip()]
    with open(out, "w") as f:
        for first, second in zip(records[::2], records[1::2]):
            turns = [{"role": "system", "content": "You are a helpful assistant."}]
            for r in (first, second):
                question = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
                turns += [{"role": "user", "content": question}, {"role": "assistant", "content": r["output"]}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
