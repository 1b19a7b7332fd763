"""Forgetting and task evaluation of a fine-tuned model against its ORIGINAL base, through
transformers (CUDA when present, else CPU in float32).

General text (--general-text, a .txt file):
  forgetting_loss  the MiLoRA paper's forgetting loss (section 5.4, after Kalajdzievski 2024):
                   mean over predicted tokens of -sum_v p_base(v) log p_ft(v), the fine-tuned
                   model's cross-entropy against the base model's predicted distribution
  base_entropy     its value for an unchanged model; forgetting_kl = the difference = KL(base || ft)
  base_ppl / finetuned_ppl   plain perplexity of both models on the same tokens
  The file is windowed as the trainer's forgetting data is: each line tokenized without
  special tokens, lines concatenated, cut into --seq-len + 1 token windows (remainder dropped),
  each window scoring its --seq-len next-token predictions.

Task (--task-file, jsonl/json/parquet in a project template, e.g. held-out instructions):
  task_loss        mean cross-entropy over response tokens (EOS included), as trained
  exact_match      greedy generation (cut at EOS or the template's next "### " section) compared
                   with the reference response: normalised text (--answer-extractor exact) or
                   the final number ("final_number": after "####", else "answer is", else the
                   last number in the text)

The fine-tuned model is --merged (a merged HF folder; both models are loaded) or --adapter
(a PEFT adapter on --base; the base distribution is the same model with the adapter disabled).
With neither, the base is evaluated against itself (forgetting_kl = 0). A --merged or
--adapter folder that carries a tokenizer other than --base's (vocabulary, special tokens,
merges) is refused: the two models would read the same ids as different tokens. One that
records no base checkpoint cannot be checked against --base: a note says so.

Example:
  tools/analyze/forgetting.py --base hf_llama --adapter peft_adapter --general-text wiki.txt \\
      --task-file test.jsonl --answer-extractor final_number --out-json forgetting.json
"""

import argparse
import sys


def format_table(result: dict) -> str:
    lines = []
    g = result.get("general")
    if g:
        lines.append(f"general text {g['file']}: {g['tokens']} predicted tokens "
                     f"in {g['windows']} windows of {g['seq_len']}")
        lines.append(f"  {'forgetting loss':<18}{g['forgetting_loss']:>10.4f}")
        lines.append(f"  {'base entropy':<18}{g['base_entropy']:>10.4f}")
        lines.append(f"  {'KL(base || ft)':<18}{g['forgetting_kl']:>10.4f}")
        lines.append(f"  {'perplexity':<18}{'base':>10}{'finetuned':>12}")
        lines.append(f"  {'':<18}{g['base_ppl']:>10.3f}{g['finetuned_ppl']:>12.3f}")
    t = result.get("task")
    if t:
        lines.append(f"task {t['file']} (template {t['template']}, answers: {t['answer_extractor']})")
        lines.append(f"  {'model':<12}{'task loss':>10}{'exact match':>14}{'examples':>10}")
        for which in ("finetuned", "base"):
            if which in t:
                m = t[which]
                lines.append(f"  {which:<12}{m['task_loss']:>10.4f}{m['exact_match']:>14.4f}{m['examples']:>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="ORIGINAL base HF model folder (also supplies the tokenizer)")
    ft = p.add_mutually_exclusive_group()
    ft.add_argument("--merged", help="merged fine-tuned HF model folder")
    ft.add_argument("--adapter", help="PEFT LoRA adapter folder to apply to --base")
    p.add_argument("--general-text", help="held-out general text (.txt) for the forgetting loss and perplexity")
    p.add_argument("--task-file", help="held-out task file (jsonl/json/parquet) for task loss and exact match")
    p.add_argument("--template", default="alpaca", choices=["alpaca", "metamath"],
                   help="prompt template of --task-file, as in training (default alpaca)")
    p.add_argument("--answer-extractor", default="exact", choices=["exact", "final_number"],
                   help="how a generation is compared with the reference: whole normalised text, or "
                        "the final number (arithmetic word problems); default exact")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy generation length limit (default 64)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass / generate call (default 4)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="general-text window length in predicted tokens (default 512)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="use at most this many general-text windows (default all)")
    p.add_argument("--max-examples", type=int, default=None, help="use at most this many task records (default all)")
    p.add_argument("--task-on-base", action="store_true", help="also score the base model on the task")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--out-json", default=None, help="write all numbers (and 5 sample generations) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not (args.general_text or args.task_file):
        p.error("give --general-text and/or --task-file")
    for flag in ("max_new_tokens", "batch_size", "seq_len", "max_windows", "max_examples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")

    from milora_megatron.analysis.forgetting import evaluate
    from milora_megatron.analysis.outputs import write_json
    from milora_megatron.errors import exit_with

    try:
        result = evaluate(args.base, finetuned_dir=args.merged, adapter_dir=args.adapter,
                          general_text=args.general_text, task_file=args.task_file, template=args.template,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                          max_windows=args.max_windows, max_examples=args.max_examples,
                          answer_extractor=args.answer_extractor, task_on_base=args.task_on_base,
                          device=args.device, dtype=args.dtype, progress=not args.quiet)
        note = (result.get("base_check") or {}).get("note")
        if note:
            print(f"forgetting: note: {note}", file=sys.stderr)
        print(format_table(result))
        if args.out_json:
            write_json(args.out_json, result)
            print(f"results written: {args.out_json}")
    except Exception as exc:  # the user's errors are one line; a bug keeps its traceback
        return exit_with(exc, "forgetting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
