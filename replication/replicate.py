#!/usr/bin/env python
"""A small replication of the MiLoRA paper's claims on CPU (2 cores, under 90 minutes).

  1. corpus: docstrings of Python's standard library and torch (real prose, offline;
     replication/corpus.py), split by source file into pre-training and held-out text
  2. pre-train a ~5M-parameter Llama from scratch on it, in HF format (replication/pretrain.py),
     or with --base smollm2 fetch SmolLM2-135M-Instruct (replication/bases.py: its schedule)
  3. task: templated arithmetic word problems (replication/arithmetic.py), train/test disjoint
  4. tools/convert/hf_to_megatron.py
  5. per method, learning rate (x0.5, x1, x2 of the config's lr) and seed (1, 2): torchrun
     launch/pretrain_milora.py (2 gloo ranks, configs/replication_cpu.yaml, identical settings
     for every method but the paper's alpha convention), export the merged model and the PEFT
     adapter (tools/convert/megatron_to_hf.py), evaluate with milora_megatron.analysis (exact
     match on the test problems; the paper's forgetting loss on the held-out corpus text
     against the pre-trained model; spectrum of the adapter's dW); then a third seed at the
     points the matched-accuracy table reads (replication/tradeoff.py)
  6. results/RESULTS.md (the trade-off: Pareto fronts, forgetting at matched accuracy, best
     accuracy, computed claims; the x1 table as before), tradeoff.png, replication.png, runs.json

Every stage keeps its output in --work and is skipped when rerun, so an interrupted run
continues and a second run re-uses the pre-trained model.

    python replication/replicate.py                    # the full replication (make replicate)
    python replication/replicate.py --base smollm2     # on a real model (make replicate-smollm2)
    python replication/replicate.py --seeds 1 --extra-seeds "" --lr-scales 1 --iters 20 --pretrain-steps 50   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from milora_megatron.adapters.variants import available, get_variant  # noqa: E402
from replication import arithmetic, bases, corpus, report, tradeoff  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "replication_cpu.yaml")


def config_lr() -> float:
    """The config's lr: the paper uses one lr (3e-4) for every method, so this is each
    method's paper setting scaled to the tiny model, and the sweep's unit there."""
    from milora_megatron.train.config import load_config

    return load_config(CONFIG).train.lr


def write_atomic(path: str, text: str) -> None:
    """An interrupted report leaves the committed one whole."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list[str], logfile: str) -> None:
    """Run a stage's command, its output to ``logfile``; on failure show the tail."""
    with open(logfile, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if rc != 0:
        tail = open(logfile).read()[-3000:]
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n--- {logfile} (tail)\n{tail}")


def prepare(args, work: str) -> dict:
    """Corpus, base model (pre-trained here or fetched), task data, converted checkpoint."""
    paths = {k: os.path.join(work, v) for k, v in {
        "corpus": "corpus", "hf": "base_hf", "ckpt": "base_ckpt", "task": "task"}.items()}
    info_path = os.path.join(paths["corpus"], "corpus.json")
    if not os.path.exists(info_path):
        log("1. corpus: docstrings of the Python standard library and torch")
        info = corpus.build(paths["corpus"])
        with open(info_path, "w") as f:
            json.dump(info, f, indent=2)
    info = json.load(open(info_path))
    log(f"   corpus: {info['train.txt']['chars'] / 1e6:.2f}M chars pre-training, "
        f"{info['heldout.txt']['chars'] / 1e6:.2f}M held out (sha256 {info['sha256'][:12]})")
    train_txt, held_txt = (os.path.join(paths["corpus"], n) for n in ("train.txt", "heldout.txt"))

    if args.base.name == "smollm2":
        paths["hf"], pre = bases.prepare_smollm2(log)
    else:
        pre = bases.prepare_scratch(paths["hf"], train_txt, held_txt, args.pretrain_steps, log)

    os.makedirs(paths["task"], exist_ok=True)
    task_train, task_test = (os.path.join(paths["task"], n) for n in ("train.jsonl", "test.jsonl"))
    if not os.path.exists(task_test):
        log("3. task: arithmetic word problems")
        arithmetic.write_splits(task_train, task_test + ".tmp", n_train=2000, n_test=args.test_examples)
        os.replace(task_test + ".tmp", task_test)

    if not os.path.exists(os.path.join(paths["ckpt"], "milora_base.json")):
        log(f"4. HF -> megatron (TP={args.tp})")
        sh([sys.executable, os.path.join(ROOT, "tools/convert/hf_to_megatron.py"), "--hf-dir", paths["hf"],
            "--out", paths["ckpt"], "--tp", str(args.tp), "--overwrite", "--quiet"], os.path.join(work, "convert.log"))
    return {**paths, "train_txt": train_txt, "held_txt": held_txt, "task_train": task_train, "task_test": task_test,
            "corpus_info": info, "pretrain": pre}


def evaluate_model(args, p: dict, finetuned_dir: str | None = None) -> dict:
    """Forgetting on the held-out corpus text and exact match on the test problems (the base
    model against itself when ``finetuned_dir`` is None)."""
    from milora_megatron.analysis.forgetting import evaluate

    return evaluate(p["hf"], finetuned_dir=finetuned_dir, general_text=p["held_txt"], task_file=p["task_test"],
                    template="metamath", max_new_tokens=24, batch_size=32, seq_len=256,
                    max_windows=args.heldout_windows, answer_extractor="final_number", progress=False)


def fine_tune(args, p: dict, method: str, seed: int, scale: float, work: str) -> dict:
    """Train, export and evaluate one (method, seed, lr scale); cached in its result.json."""
    from milora_megatron.analysis.deltas import spectrum_report

    folder = os.path.join(work, "runs", f"{method}_lr{scale:g}_seed{seed}")
    result_path = os.path.join(folder, "result.json")
    if os.path.exists(result_path):
        cached = json.load(open(result_path))
        want = {"iters": args.iters, "lr": scale * args.lr, "rank": args.rank}
        if any(cached.get(k) != v for k, v in want.items()):
            raise SystemExit(f"{result_path} was trained with {({k: cached.get(k) for k in want})}, not {want}: "
                             "pass another --work (or delete that folder)")
        return cached
    os.makedirs(folder, exist_ok=True)
    run, merged, peft = (os.path.join(folder, n) for n in ("run", "hf_merged", "peft_adapter"))
    start = time.time()
    overrides = [f"model.load={p['ckpt']}", f"data.train={p['task_train']}", f"data.forgetting={p['held_txt']}",
                 f"output.dir={run}", f"peft.method={method}", f"peft.rank={args.rank}",
                 f"peft.alpha={get_variant(method).paper_alpha_per_rank * args.rank}", f"train.seed={seed}", f"train.iters={args.iters}",
                 f"train.lr={scale * args.lr:g}", f"parallel.tp={args.tp}"]
    sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(ROOT, "launch/pretrain_milora.py"), "--config", CONFIG,
        *overrides], os.path.join(folder, "train.log"))
    export = os.path.join(ROOT, "tools/convert/megatron_to_hf.py")
    sh([sys.executable, export, "--ckpt", run, "--out", merged, "--overwrite", "--quiet"], os.path.join(folder, "export.log"))
    sh([sys.executable, export, "--ckpt", run, "--out", peft, "--overwrite", "--adapter-only"],
       os.path.join(folder, "export_peft.log"))
    train_s = time.time() - start
    ev = evaluate_model(args, p, finetuned_dir=merged)
    spec = spectrum_report(p["hf"], adapter_dir=peft, progress=False)
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    losses = [m["loss"] for m in metrics if "loss" in m]
    trainer_forgetting = [m["forgetting_loss"] for m in metrics if "forgetting_loss" in m]
    result = {"method": method, "seed": seed, "lr_scale": scale, "lr": scale * args.lr, "rank": args.rank, "alpha": get_variant(method).paper_alpha_per_rank * args.rank,
              "iters": args.iters, "train_loss_first": losses[0], "train_loss_last": losses[-1],
              "trainer_forgetting_loss": trainer_forgetting[-1] if trainer_forgetting else None,
              "eval": ev, "spectrum": spec["summary"], "train_export_s": round(train_s, 1),
              "total_s": round(time.time() - start, 1)}
    write_atomic(result_path, json.dumps(result, indent=2))
    return result


def sweep_plan(methods: list[str], scales: list[float], seeds: list[int], sweep_seeds: list[int]) -> list[tuple[int, str, float]]:
    """(seed, method, lr scale) of the first pass: ``seeds`` at x1, ``sweep_seeds`` at the other
    scales; seed by seed, so an interrupted sweep already holds whole seeds."""
    return [(s, m, k) for s in dict.fromkeys(seeds + sweep_seeds) for k in scales for m in methods
            if s in (seeds if k == 1 else sweep_seeds)]


def run_all(args, p: dict, plan: list[tuple[int, str, float]], work: str, stage: str) -> list[dict]:
    out = []
    for i, (seed, method, scale) in enumerate(plan):
        t0 = time.time()
        r = fine_tune(args, p, method, seed, scale, work)
        f = report.flatten(r)
        log(f"{stage} [{i + 1}/{len(plan)}] {method} lr x{scale:g} seed {seed}: exact match {f['accuracy']:.1f}%, "
            f"forgetting KL {f['forgetting_kl']:.4f}, sim bottom/top {f['sim_bottom']:.3f}/{f['sim_top']:.3f} "
            f"({time.time() - t0:.0f} s)")
        out.append(r)
    return out


def base_task_accuracy(p: dict, args, work: str) -> dict:
    path = os.path.join(work, "base_eval.json")
    if not os.path.exists(path):
        write_atomic(path, json.dumps(evaluate_model(args, p), indent=2))
    return json.load(open(path))


def write_report(args, p: dict, results: list[dict], base: dict, elapsed_min: float) -> str:
    os.makedirs(args.report_dir, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in results))
    pts = tradeoff.points(results)
    # the single-lr view at the paper setting (x1), as the paper reports it
    at_one = {m: [r for r in results if r["method"] == m and r["lr_scale"] == 1.0] for m in methods}
    at_one = {m: v for m, v in at_one.items() if v}
    one_lr = ""
    if at_one:
        stats = report.aggregate(at_one)
        report.plot(stats, os.path.join(args.report_dir, "replication.png"))
        seeds = sorted({r["seed"] for v in at_one.values() for r in v})
        one_lr = f"""## At the paper's one learning rate (x1)

Mean ± sample std over seeds {seeds} (points the matched-accuracy table reads have the extra seeds):

{report.markdown_table(stats, {"base_ppl": base["general"]["base_ppl"]})}

![replication](replication.png)

What these numbers say about the paper's ordering at one learning rate (computed, not edited):

""" + "\n".join(f"- {c}" for c in report.ordering(stats)) + "\n"
    pre, info = p["pretrain"], p["corpus_info"]
    from milora_megatron.train.config import load_config

    t = load_config(CONFIG).train
    runs_min = sum(r["total_s"] for r in results) / 60
    sweep = ""
    if len(args.lr_scales) > 1:
        tradeoff.plot(pts, os.path.join(args.report_dir, "tradeoff.png"))
        sweep = f"""## The trade-off across learning rates

A method that moves less both learns less and forgets less, so one learning rate cannot separate the two.
Each method's Pareto front (no other of its points is both more accurate and forgets less) is compared at
the accuracies MiLoRA's own front points reach; the others' forgetting there is interpolated linearly in
accuracy between their two bracketing front points, the spread (sample std over seeds) the same way.

![trade-off](tradeoff.png)

Forgetting KL at matched accuracy (mean ± std):

{tradeoff.matched_table(pts)}

Best accuracy each method reaches over the sweep:

{tradeoff.best_table(pts)}

What the sweep says (computed, not edited):

""" + "\n".join(f"- {c}" for c in tradeoff.claims(pts)) + f"""

Every point:

{tradeoff.sweep_table(pts)}

"""
    seeds_line = (f"Seeds {args.seeds} at every point" if args.sweep_seeds == args.seeds else
                  f"Seeds {args.seeds} at x1, {args.sweep_seeds} at the other learning rates")
    prep_word = "fetching the model" if args.base.name == "smollm2" else "pre-training"
    command = "python replication/replicate.py " + " ".join(sys.argv[1:])
    title = " on SmolLM2-135M-Instruct" if args.base.name == "smollm2" else ""
    text = f"""# CPU replication of the MiLoRA claims{title}

Command: `{command.strip()}` (`{args.base.make_target}` runs the defaults). Time on 2 CPU cores: {prep_word}
{pre['minutes']:.1f} min, the {len(results)} fine-tuning runs {runs_min:.1f} min (train + export + evaluation), about
{pre['minutes'] + runs_min + 1:.0f} min end to end from an empty --work; this invocation {elapsed_min:.1f} min (stages found
in --work are reused).

- Base model: {bases.describe(args.base, pre, info)}.
- Task: arithmetic word problems (sums and differences of numbers 1-10, `metamath` template, response
  "a + b = c. The answer is c"); 2000 training problems, {args.test_examples} disjoint test problems; exact match on the
  final number with greedy decoding. The base model scores {100 * base['task']['finetuned']['exact_match']:.1f}%.
- Fine-tuning: this project's convert -> train -> export path with 2 gloo ranks (TP={args.tp}, DP={2 // args.tp}),
  configs/replication_cpu.yaml for every method: rank {args.rank}, alpha = 2r for LoRA and r for PiSSA/MiLoRA/MiCA
  (the paper's convention), dropout 0.05, targets q,k,v,up,down, {t.schedule} schedule, warmup {t.warmup},
  {args.iters} steps of {t.global_batch} problems ({t.micro_batch} per micro-batch), seq_len {t.seq_len} (every problem
  fits). Learning rates: {', '.join(f'x{k:g}' for k in args.lr_scales)} of lr {args.lr:g} for every method (the paper
  uses one lr, 3e-4, for LoRA, PiSSA and MiLoRA alike; {args.lr:g} is that setting for this model), so the grid is
  the same in units of each method's paper setting. Cut to fit the CPU: {args.base.cut}. {seeds_line}, plus {args.extra_seeds or 'none'}
  at the points the matched-accuracy table reads (chosen by the script after the first pass); seeds change data
  order, dropout and LoRA's random A. Nothing else was tuned per method.
- Forgetting: the paper's forgetting loss (cross-entropy of the fine-tuned model's next-token distribution
  against the pre-trained model's, per token) on {args.heldout_windows} windows of 256 held-out tokens, computed
  from the exported merged model with transformers (tools/analyze/forgetting.py). "Forgetting KL" subtracts the
  base model's own entropy ({base['general']['base_entropy']:.4f}), so 0 means nothing forgotten.
- Spectrum (tools/analyze/spectrum.py on the PEFT export): means over all adapted matrices of the
  amplification factor ||dW||_F / ||U^T W V||_F and of the normalised subspace similarity of dW's top-r
  singular vectors to W's bottom-r and top-r ones (mean of left and right).

{sweep}{one_lr}"""
    path = os.path.join(args.report_dir, "RESULTS.md")
    write_atomic(path, text)
    write_atomic(os.path.join(args.report_dir, "runs.json"),
                 json.dumps({"base": base, "runs": results, "pretrain": pre, "corpus": info}, indent=2))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", choices=sorted(bases.BASES), default="scratch",
                    help="scratch: a ~5M Llama pre-trained here (default); smollm2: SmolLM2-135M-Instruct, fetched "
                         "once (a reduced schedule on CPU; see replication/bases.py)")
    ap.add_argument("--work", help="folder for every stage's output, reused when rerun "
                                   "(default runs/replication, runs/replication_smollm2)")
    ap.add_argument("--report-dir", help="where RESULTS.md, the plots and runs.json go "
                                         "(default replication/results, replication/results/smollm2_cpu)")
    ap.add_argument("--methods", default="lora,pissa,milora,mica", help="comma-separated methods")
    ap.add_argument("--seeds", help="comma-separated training seeds at x1, and at every other lr unless --sweep-seeds "
                                    "(default 1,2)")
    ap.add_argument("--sweep-seeds", help="seeds at the learning rates other than x1 (default: --seeds; 1 for smollm2, "
                                          "whose runs take minutes each on CPU)")
    ap.add_argument("--extra-seeds", help="seeds added at the points the matched-accuracy table reads "
                                          "('' for none; default 3 for scratch, none for smollm2)")
    ap.add_argument("--lr-scales", help="learning rates as multiples of the base's lr, the paper's one setting for "
                                        "every method (default 0.5,1,2)")
    ap.add_argument("--lr", type=float, help="the sweep's unit (default: the config's 2e-3 for scratch, "
                                             "the paper's 3e-4 for smollm2)")
    ap.add_argument("--rank", type=int, default=8, help="adapter rank, the same for every method")
    ap.add_argument("--tp", type=int, choices=(1, 2), help="tensor parallel size of the 2 training ranks "
                                                           "(1: data parallel over them; default 2, 1 for smollm2)")
    ap.add_argument("--iters", type=int, help="fine-tuning steps of global batch 16 (default 300, 40 for smollm2)")
    ap.add_argument("--pretrain-steps", type=int, default=800, help="pre-training steps (batch 16 x 256 tokens)")
    ap.add_argument("--test-examples", type=int, default=200, help="held-out arithmetic problems")
    ap.add_argument("--heldout-windows", type=int, default=64, help="256-token windows of held-out text for forgetting")
    args = ap.parse_args()
    args.base = bases.BASES[args.base]
    for key in ("seeds", "sweep_seeds", "extra_seeds", "lr_scales", "tp", "iters", "lr"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(args.base, key))
    args.lr = args.lr or config_lr()
    if args.base.name == "smollm2" and args.tp != 1:
        ap.error("SmolLM2-135M has 9 attention heads: --tp 1 (its other divisor, 3, needs 3 ranks)")
    args.work = args.work or os.path.join(ROOT, "runs", args.base.work)
    args.report_dir = args.report_dir or os.path.join(ROOT, "replication", "results", args.base.report)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.sweep_seeds = [int(s) for s in args.sweep_seeds.split(",")] if args.sweep_seeds else args.seeds
    args.extra_seeds = [int(s) for s in args.extra_seeds.split(",") if s.strip() and int(s) not in args.seeds]
    args.lr_scales = [float(k) for k in args.lr_scales.split(",")]
    methods = args.methods.split(",")
    unknown = set(methods) - set(available())
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {available()}")
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.time()
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    p = prepare(args, work)
    base = base_task_accuracy(p, args, work)
    scales = args.lr_scales
    plan = sweep_plan(methods, scales, args.seeds, args.sweep_seeds)
    results = run_all(args, p, plan, work, "5.")
    extra = sorted(tradeoff.relied_on(tradeoff.points(results)), key=lambda mk: (methods.index(mk[0]), mk[1]))
    if args.extra_seeds and extra:
        log(f"   matched-accuracy table reads {len(extra)} points: "
            + ", ".join(f"{m} x{k:g}" for m, k in extra) + f"; seeds {args.extra_seeds} there")
        more = [(s, m, k) for s in args.extra_seeds for m, k in extra if (s, m, k) not in plan]  # a seed counts once
        results += run_all(args, p, more, work, "5b.")
    path = write_report(args, p, results, base, (time.time() - start) / 60)
    log(f"6. report: {path}")
    print(open(path).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
