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

import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

import torch

from ..data import TEMPLATES, load_records, text_samples, tokenize_examples
from ..errors import CheckpointError, ConfigError, MissingPathError, UserError, is_disk_full
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
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:  # "Expected one of cpu, cuda, ... device type at start of device string"
        raise ConfigError(f"--device {device!r} is not a torch device ({str(exc).splitlines()[0]})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    if dtype is None:
        return dev, torch.float32 if dev.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose from {sorted(DTYPES)}")
    return dev, DTYPES[dtype]


def _check_model_folder(path: str) -> None:
    """A local HF model folder with a config and weights (transformers would otherwise take a
    folder without weights for a hub id and answer "Repo id must be in the form ...")."""
    if os.path.isfile(path):
        raise CheckpointError(f"{path} is a file, not an HF model folder (give the folder that holds config.json)")
    if not os.path.isdir(path):
        raise MissingPathError(f"model folder {path} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingPathError(f"{path} has no config.json (not an HF model folder)")
    if not any(n.endswith((".safetensors", ".bin")) for n in os.listdir(path)):
        raise MissingPathError(f"{path} holds no weights (*.safetensors)")


@contextmanager
def _loading(folder: str, what: str):
    """transformers' refusal of a folder (an unknown model type, a broken tokenizer file) as
    one line naming it; a full disk and our own errors pass through."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, UserError) or is_disk_full(exc):
            raise
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"{folder}: transformers cannot load its {what}: "
                              f"{lines[0] if lines else type(exc).__name__}") from exc


# ---- tokenizers: both models must read the same tokens -----------------------------------
# the files a saved tokenizer consists of (any one of them: the folder carries a tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "tokenizer.tiktoken")


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    with _loading(folder, "tokenizer"):
        return AutoTokenizer.from_pretrained(folder)


def _backend(tok) -> dict:
    """The fast tokenizer's own definition (model with its merges, normalizer, pre-tokenizer)."""
    backend = getattr(tok, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _merges(definition: dict) -> list[str] | None:
    merges = (definition.get("model") or {}).get("merges")
    if merges is None:
        return None
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokenizer_difference(a, b) -> str | None:
    """What makes tokenizer ``b`` read text differently from ``a``, in a few words; None when
    they are the same tokenizer (however many times saved): the vocabulary (every id's token,
    added tokens included), the special tokens, the BPE merges and how text is normalised and
    split before them."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        ia, ib = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
        ids = sorted(set(ia) | set(ib))
        i = next(i for i in ids if ia.get(i) != ib.get(i))
        shown = [repr(t) if t is not None else "absent" for t in (ia.get(i), ib.get(i))]
        return f"vocabulary: {len(va)} vs {len(vb)} tokens, id {i} is {shown[0]} vs {shown[1]}"
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        ta, tb = getattr(a, name, None), getattr(b, name, None)
        if str(ta) != str(tb):
            return f"special tokens: {name} {ta!r} vs {tb!r}"
    sa, sb = sorted(map(str, a.all_special_tokens)), sorted(map(str, b.all_special_tokens))
    if sa != sb:
        return f"special tokens: {sa[:8]} vs {sb[:8]}"
    da, db = _backend(a), _backend(b)
    ma, mb = _merges(da), _merges(db)
    if ma != mb:
        if ma is None or mb is None:
            return f"merges: {'none' if ma is None else len(ma)} vs {'none' if mb is None else len(mb)}"
        i = _first_difference(ma, mb)
        return (f"merges: {len(ma)} vs {len(mb)}, first difference at merge {i}: "
                f"{ma[i] if i < len(ma) else None!r} vs {mb[i] if i < len(mb) else None!r}")
    for part in ("normalizer", "pre_tokenizer"):
        if da.get(part) != db.get(part):
            return f"{part.replace('_', '-')}: {json.dumps(da.get(part))[:80]} vs {json.dumps(db.get(part))[:80]}"
    return None


def check_same_tokenizer(tokenizer, tokenizer_dir: str, other_dir: str, role: str) -> None:
    """Refuse ``other_dir`` (a merged model or an adapter, given as ``role``) when it carries a
    tokenizer that is not ``tokenizer`` (loaded from ``tokenizer_dir``): the models would
    be compared on tokens that mean different things to each, and the KL would mean nothing."""
    if not has_tokenizer(other_dir):
        return  # it reads the base's tokens: nothing to compare
    difference = tokenizer_difference(tokenizer, load_tokenizer(other_dir))
    if difference:
        raise CheckpointError(f"the tokenizers of --base {tokenizer_dir} and {role} {other_dir} differ ({difference}): "
                              "the two models would be compared on tokens that mean different things")


def load_pair(base_dir: str, finetuned_dir: str | None = None, adapter_dir: str | None = None,
              device: str | None = None, dtype: str | None = None, tokenizer_dir: str | None = None) -> ModelPair:
    """Base + (merged fine-tuned folder | PEFT adapter folder | nothing: the base against itself).
    A merged folder or adapter that carries a tokenizer other than the base's is refused."""
    from transformers import AutoModelForCausalLM

    if finetuned_dir and adapter_dir:
        raise ValueError("give at most one of finetuned_dir (merged model) and adapter_dir (PEFT adapter)")
    dev, dt = default_device_dtype(device, dtype)
    for folder in (base_dir, finetuned_dir):
        if folder:
            _check_model_folder(folder)  # before the tokenizer, whose errors would not say this
    if adapter_dir and not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise MissingPathError(f"{adapter_dir} has no adapter_config.json (not a PEFT adapter folder)")

    def load(path):
        with _loading(path, "model"):
            return AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(dev).eval()

    tokenizer = load_tokenizer(tokenizer_dir or base_dir)
    if finetuned_dir or adapter_dir:  # before the models: cheap, and a refusal wastes no load
        check_same_tokenizer(tokenizer, tokenizer_dir or base_dir, finetuned_dir or adapter_dir,
                             "--merged" if finetuned_dir else "--adapter")
    base = load(base_dir)
    if adapter_dir:
        from peft import PeftModel

        try:
            adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
        except (RuntimeError, ValueError) as exc:  # size mismatches, missing target modules: another model's
            if isinstance(exc, UserError):
                raise
            raise CheckpointError(f"{adapter_dir} does not fit the base {base_dir}: "
                                  f"{str(exc).strip().splitlines()[-1]}") from None
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
        raise ConfigError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    base_check = None  # whether --base is the model the export records (not asked with a loaded pair)
    if pair is None and (finetuned_dir or adapter_dir):
        note = check_base(base_dir, finetuned_dir or adapter_dir)
        base_check = {"verified": note is None, "note": note}
    if isinstance(answer_extractor, str) and answer_extractor not in EXTRACTORS:
        raise ConfigError(f"unknown answer_extractor {answer_extractor!r}; known: {sorted(EXTRACTORS)}")
    pair = pair or load_pair(base_dir, finetuned_dir, adapter_dir, device, dtype)
    result = {"base": base_dir, "finetuned": finetuned_dir, "adapter": adapter_dir, "device": str(pair.device),
              "dtype": str(next(pair.finetuned.parameters()).dtype).replace("torch.", "")}
    if base_check:
        result["base_check"] = base_check
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
