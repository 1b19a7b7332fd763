"""Tiny HF Llamas for the tests (the builders live in the package, shared with the demo)."""

from __future__ import annotations

import torch

from milora_megatron.models.tiny_hf import FAMILIES, LLAMA3_ROPE, MOE_FAMILIES, TINY, hf_config, make_hf_model, make_tokenizer  # noqa: F401


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def alpaca_records(n: int, seed: int = 0) -> list[dict]:
    """Small arithmetic instructions with checkable answers."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rec = {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"The sum is {a + b}."}
        if i % 3 == 0:
            rec = {"instruction": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."}
        out.append(rec)
    return out
