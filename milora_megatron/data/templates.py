"""Prompt templates: how a record becomes a prompt (no loss) and a response (the loss).

Public so that training, the analysis tools, the demo and the replication format prompts
the same way. A new template is one ``Template`` added to ``TEMPLATES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n")
PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n")


@dataclass(frozen=True)
class Template:
    name: str
    required: tuple[str, ...]  # fields every record must have
    optional: tuple[str, ...]
    format: Callable[[dict], tuple[str, str]] | None  # record -> (prompt, response); None: chat (data/chat.py)

    @property
    def is_chat(self) -> bool:
        return self.format is None


def instruction_prompt(instruction: str, input_text: str | None = None) -> str:
    """The Alpaca prompt for an instruction (and an optional input)."""
    if input_text:
        return f"{PREAMBLE_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"{PREAMBLE}### Instruction:\n{instruction}\n\n### Response:\n"


TEMPLATES = {t.name: t for t in (
    Template("alpaca", ("instruction", "output"), ("input",),
             lambda r: (instruction_prompt(r["instruction"], r.get("input")), r["output"])),
    Template("metamath", ("query", "response"), (), lambda r: (instruction_prompt(r["query"]), r["response"])),
    Template("chat", ("messages",), (), None),  # the tokenizer's own chat template, loss on assistant turns
)}
