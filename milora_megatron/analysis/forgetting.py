"""Forgetting and task evaluation of a fine-tuned model against its base, through transformers.

Forgetting loss (MiLoRA paper section 5.4, after Kalajdzievski 2024): the next-token
cross-entropy of the fine-tuned model against the BASE model's predicted distribution,
``-sum_v p_base(v) log p_ft(v)``, averaged over predicted tokens of held-out general text.
It equals the base model's entropy when nothing changed, so the KL part
``forgetting_loss - base_entropy = KL(p_base || p_ft)`` is reported too.

General text is read exactly as the trainer reads its forgetting data
(``data.text_samples``): each line of the .txt is tokenized without special tokens,
the lines are concatenated, cut into windows of seq_len + 1 tokens (the remainder dropped),
and each window scores its seq_len next-token predictions. The in-training
``forgetting_loss`` in metrics.jsonl is therefore the same quantity.

Task evaluation uses the project's templates (``data.TEMPLATES``): response-token
cross-entropy (EOS included, as trained) and greedy-generation exact match.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

import torch

from ..data import TEMPLATES, load_records, text_samples, tokenize_examples
from .provenance import check_base

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SECTION = "\n\n### "  # the templates' section separator: a generation that reaches it has ended


# ---- models ------------------------------------------------------------------------------
@dataclass
class ModelPair:
    """The fine-tuned model and its base. ``base`` is None when the fine-tuned model is a PEFT
    model: the base is then the same model under ``disable_adapter()`` (one copy in memory)."""

    tokenizer: object
    finetuned: torch.nn.Module
    base: torch.nn.Module | None
    device: torch.device

    @contextmanager
    def use(self, which: str):
        """The model to run for ``which`` in ("base", "finetuned")."""
        if which == "finetuned":
            yield self.finetuned
        elif self.base is not None:
            yield self.base
        else:
            with self.finetuned.disable_adapter():
                yield self.finetuned


def default_device_dtype(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA when present, else CPU; float32 on CPU, bfloat16 on CUDA unless ``dtype`` says."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        return dev, torch.float32 if dev.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {sorted(DTYPES)}")
    return dev, DTYPES[dtype]


def _check_model_folder(path: str) -> None:
    """A local HF model folder with a config and weights (transformers would otherwise take a
    folder without weights for a hub id and answer "Repo id must be in the form ...")."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json (not an HF model folder)")
    if not any(n.endswith((".safetensors", ".bin")) for n in os.listdir(path)):
        raise FileNotFoundError(f"{path} holds no weights (*.safetensors)")


def load_pair(base_dir: str, finetuned_dir: str | None = None, adapter_dir: str | None = None,
              device: str | None = None, dtype: str | None = None, tokenizer_dir: str | None = None) -> ModelPair:
    """Base + (merged fine-tuned folder | PEFT adapter folder | nothing: the base against itself)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if finetuned_dir and adapter_dir:
        raise ValueError("give at most one of finetuned_dir (merged model) and adapter_dir (PEFT adapter)")
    dev, dt = default_device_dtype(device, dtype)
    for folder in (base_dir, finetuned_dir):
        if folder:
            _check_model_folder(folder)  # before the tokenizer, whose errors would not say this

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(dev).eval()

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or base_dir)
    base = load(base_dir)
    if adapter_dir:
        from peft import PeftModel

        if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
            raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json (not a PEFT adapter folder)")
        try:
            adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
        except RuntimeError as exc:  # e.g. size mismatches: an adapter of another model
            raise ValueError(f"{adapter_dir} does not fit the base {base_dir}: {str(exc).strip().splitlines()[-1]}") from None
        return ModelPair(tokenizer, adapted, None, dev)
    if finetuned_dir:
        return ModelPair(tokenizer, load(finetuned_dir), base, dev)
    return ModelPair(tokenizer, base, base, dev)


def _batches(n: int, size: int, desc: str, progress: bool):
    from tqdm import tqdm

    starts = range(0, n, size)
    return tqdm(starts, desc=desc, unit="batch", disable=not progress, file=sys.stderr)


# ---- general text: forgetting and perplexity ----------------------------------------------------
@torch.no_grad()
def general_text_metrics(pair: ModelPair, text_path: str, seq_len: int = 512, batch_size: int = 4,
                         max_windows: int | None = None, progress: bool = True) -> dict:
    """Forgetting loss, base entropy, KL(base || fine-tuned), and both models' perplexity."""
    windows, _ = text_samples(text_path, pair.tokenizer, seq_len, max_windows)
    sums = dict(forgetting=0.0, entropy=0.0, kl=0.0, nll_base=0.0, nll_ft=0.0)
    count = 0
    for start in _batches(len(windows), batch_size, "general text", progress):
        w = windows[start : start + batch_size].to(pair.device)
        inputs, labels = w[:, :-1], w[:, 1:].unsqueeze(-1)
        with pair.use("base") as m:
            lb = torch.log_softmax(m(input_ids=inputs).logits.float(), -1)
        with pair.use("finetuned") as m:
            lf = torch.log_softmax(m(input_ids=inputs).logits.float(), -1)
        pb = lb.exp()
        sums["forgetting"] += float(-(pb * lf).sum(dtype=torch.float64))
        sums["entropy"] += float(-(pb * lb).sum(dtype=torch.float64))
        sums["kl"] += float((pb * (lb - lf)).sum(dtype=torch.float64))
        sums["nll_base"] += float(-lb.gather(-1, labels).sum(dtype=torch.float64))
        sums["nll_ft"] += float(-lf.gather(-1, labels).sum(dtype=torch.float64))
        count += labels.numel()
    mean = {k: v / count for k, v in sums.items()}
    return {
        "forgetting_loss": mean["forgetting"],
        "base_entropy": mean["entropy"],
        "forgetting_kl": mean["kl"],
        "base_nll": mean["nll_base"], "finetuned_nll": mean["nll_ft"],
        "base_ppl": float(torch.tensor(mean["nll_base"]).exp()),
        "finetuned_ppl": float(torch.tensor(mean["nll_ft"]).exp()),
        "tokens": count, "windows": len(windows), "seq_len": seq_len,
    }


# ---- task: loss and exact match --------------------------------------------------------------------
def normalise_text(text: str) -> str:
    """Case-, whitespace- and final-period-insensitive form of a response."""
    return " ".join(text.lower().split()).rstrip(".").strip()


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def final_number(text: str) -> str | None:
    """The answer of an arithmetic response, canonical ("1,000.0" -> "1000"): the number after
    the last "####", else the first after the last "answer is", else the last number; None if none."""
    for marker in ("####", "answer is"):
        at = text.lower().rfind(marker)
        if at >= 0:
            m = re.search(_NUMBER, text[at + len(marker):])
            if m:
                return _canonical(m.group())
    numbers = re.findall(_NUMBER, text)
    return _canonical(numbers[-1]) if numbers else None


def _canonical(number: str) -> str | None:
    try:
        return format(Decimal(number.replace(",", "")).normalize(), "f")
    except InvalidOperation:
        return None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {"exact": normalise_text, "final_number": final_number}


def exact_match(prediction: str, reference: str, answer_extractor: str | Callable = "exact") -> bool:
    """Whether ``prediction`` answers like ``reference``: both normalised ("exact") or both
    reduced to their final number ("final_number"), or any callable text -> answer."""
    f = EXTRACTORS[answer_extractor] if isinstance(answer_extractor, str) else answer_extractor
    got, want = f(prediction), f(reference)
    return got is not None and got == want


@torch.no_grad()
def task_loss(pair: ModelPair, which: str, task_path: str, template: str, batch_size: int = 4,
              max_examples: int | None = None, progress: bool = True) -> dict:
    """Mean cross-entropy over response tokens (EOS included), as the trainer's loss mask."""
    examples = tokenize_examples(task_path, template, pair.tokenizer)[:max_examples]
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for start in _batches(len(examples), batch_size, f"task loss ({which})", progress):
        chunk = examples[start : start + batch_size]
        n = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), n)
        for i, (e_ids, e_mask) in enumerate(chunk):
            ids[i, : len(e_ids)], mask[i, : len(e_ids)] = torch.from_numpy(e_ids), torch.from_numpy(e_mask)
        attention = (torch.arange(n) < torch.tensor([len(e) for e, _ in chunk]).unsqueeze(1)).long()
        ids, mask, attention = ids.to(pair.device), mask.to(pair.device), attention.to(pair.device)
        with pair.use(which) as m:
            logp = torch.log_softmax(m(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        total += float((nll * mask[:, 1:]).sum(dtype=torch.float64))
        count += int(mask[:, 1:].sum())
    return {"task_loss": total / max(count, 1), "task_tokens": count, "task_examples": len(examples)}


@torch.no_grad()
def generate_responses(pair: ModelPair, which: str, prompts: list[str], max_new_tokens: int = 64,
                       batch_size: int = 4, progress: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), cut at EOS or at the
    template's next section heading."""
    tok = pair.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    side, tok.padding_side = tok.padding_side, "left"
    out = []
    try:
        for start in _batches(len(prompts), batch_size, f"generate ({which})", progress):
            enc = tok(prompts[start : start + batch_size], add_special_tokens=True, padding=True, return_tensors="pt")
            enc = {k: v.to(pair.device) for k, v in enc.items()}
            with pair.use(which) as m:
                gen = m.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tok.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                out.append(tok.decode(row, skip_special_tokens=True).split(SECTION)[0])
    finally:
        tok.padding_side = side
    return out


def task_accuracy(pair: ModelPair, which: str, task_path: str, template: str, max_new_tokens: int = 64,
                  batch_size: int = 4, answer_extractor: str | Callable = "exact", max_examples: int | None = None,
                  progress: bool = True) -> dict:
    """Exact-match accuracy of greedy generations against the reference responses."""
    fmt = TEMPLATES[template].format
    records = load_records(task_path)
    count = len(records) if max_examples is None else min(max_examples, len(records))
    pairs = [fmt(records[i]) for i in range(count)]
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    responses = generate_responses(pair, which, prompts, max_new_tokens, batch_size, progress)
    hits = [exact_match(g, r, answer_extractor) for g, r in zip(responses, references)]
    return {"exact_match": sum(hits) / max(len(hits), 1), "correct": sum(hits), "examples": len(hits),
            "samples": [{"reference": r, "generated": g, "correct": h}
                        for g, r, h in list(zip(responses, references, hits))[:5]]}


# ---- everything --------------------------------------------------------------------------------------------
def evaluate(base_dir: str, finetuned_dir: str | None = None, adapter_dir: str | None = None,
             general_text: str | None = None, task_file: str | None = None, template: str = "alpaca",
             max_new_tokens: int = 64, batch_size: int = 4, seq_len: int = 512, max_windows: int | None = None,
             max_examples: int | None = None, answer_extractor: str | Callable = "exact", task_on_base: bool = False,
             device: str | None = None, dtype: str | None = None, progress: bool = True,
             pair: ModelPair | None = None) -> dict:
    """Forgetting / perplexity on ``general_text`` and task loss / exact match on ``task_file``
    for the fine-tuned model (merged ``finetuned_dir`` or base + ``adapter_dir``; neither: the
    base against itself). ``task_on_base`` also scores the base on the task. A loaded
    ``pair`` (from ``load_pair``) may be passed to reuse models across calls."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    if pair is None and (finetuned_dir or adapter_dir):
        check_base(base_dir, finetuned_dir or adapter_dir)
    if isinstance(answer_extractor, str) and answer_extractor not in EXTRACTORS:
        raise ValueError(f"unknown answer_extractor {answer_extractor!r}; known: {sorted(EXTRACTORS)}")
    pair = pair or load_pair(base_dir, finetuned_dir, adapter_dir, device, dtype)
    result = {"base": base_dir, "finetuned": finetuned_dir, "adapter": adapter_dir, "device": str(pair.device),
              "dtype": str(next(pair.finetuned.parameters()).dtype).replace("torch.", "")}
    if general_text:
        result["general"] = {"file": general_text,
                             **general_text_metrics(pair, general_text, seq_len, batch_size, max_windows, progress)}
    if task_file:
        result["task"] = {"file": task_file, "template": template,
                          "answer_extractor": answer_extractor if isinstance(answer_extractor, str) else "custom"}
        for which in ("finetuned", "base") if task_on_base else ("finetuned",):
            result["task"][which] = {
                **task_loss(pair, which, task_file, template, batch_size, max_examples, progress),
                **task_accuracy(pair, which, task_file, template, max_new_tokens, batch_size, answer_extractor,
                                max_examples, progress)}
    return result
