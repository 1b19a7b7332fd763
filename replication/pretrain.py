"""Pre-train a small Llama from scratch on the corpus, in HF format (then it is just another
Hugging Face checkpoint for the converter). Plain PyTorch: AdamW, warmup + cosine, packed
windows, fp32 on CPU."""

from __future__ import annotations

import json
import math
import os
import time

import torch


def token_windows(path: str, tokenizer, seq_len: int) -> torch.Tensor:
    """The file's lines tokenized (EOS between documents), cut into seq_len + 1 windows."""
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    for chunk in range(0, len(lines), 512):
        for row in tokenizer(lines[chunk : chunk + 512], add_special_tokens=False)["input_ids"]:
            ids += row + [tokenizer.eos_token_id]
    n = seq_len + 1
    count = len(ids) // n
    return torch.tensor(ids[: count * n], dtype=torch.int64).view(count, n)


def pretrain(hf_dir: str, train_txt: str, heldout_txt: str, steps: int, batch: int, seq_len: int, lr: float,
             seed: int, shape: dict, log=print) -> dict:
    """Train and ``save_pretrained`` into ``hf_dir`` (which holds the tokenizer already)."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    from milora_megatron.models.tiny_hf import hf_config

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    train = token_windows(train_txt, tok, seq_len)
    held = token_windows(heldout_txt, tok, seq_len)[:64]
    config = hf_config(**shape)
    config.max_position_embeddings = max(512, seq_len)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    log(f"pre-training {params / 1e6:.2f}M parameters on {train.numel() / 1e6:.2f}M tokens "
        f"({len(train)} windows of {seq_len}) for {steps} steps of {batch}")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    history, start, pos = [], time.time(), 0
    model.train()
    for step in range(1, steps + 1):
        scale = step / warmup if step <= warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        if pos + batch > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        x = train[order[pos : pos + batch]]
        pos += batch
        # HF shifts the labels itself: seq_len - 1 predictions over the window's first seq_len
        # tokens (its last token is unused; kept so the committed results stay reproducible)
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps:
            rate = (time.time() - start) / step
            history.append({"step": step, "loss": round(loss.item(), 4)})
            log(f"pretrain step {step}/{steps} loss {loss.item():.3f} lr {lr * scale:.2e} "
                f"ETA {rate * (steps - step) / 60:.1f} min")
    model.eval()
    with torch.no_grad():
        held_loss = sum(model(input_ids=w[None, :-1], labels=w[None, :-1].clone()).loss.item() for w in held) / len(held)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(hf_dir)
    info = {"parameters": params, "train_tokens": train.numel(), "steps": steps, "batch": batch, "seq_len": seq_len,
            "lr": lr, "final_train_loss": history[-1]["loss"], "heldout_loss": round(held_loss, 4),
            "minutes": round((time.time() - start) / 60, 2), "history": history}
    with open(os.path.join(hf_dir, "pretrain.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info
