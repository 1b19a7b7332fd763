"""Chat-format records (``messages: [{role, content}, ...]``, or ShareGPT's ``conversations:
[{from, value}, ...]``) rendered with the tokenizer's own chat template, the loss on every
assistant turn.

Where each assistant turn lies in the rendered text is found by rendering prefixes of the
conversation: the text up to turn i with the generation prompt, and through turn i. Each
must be a prefix of the whole rendering (true of ChatML, Llama 3, Mistral and Qwen2
templates); a template that rewrites earlier turns is refused rather than guessed at. The
assistant's span includes its end-of-turn tokens, so the model learns to stop.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names (``from``) as chat roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}


class ConversationError(DataError):
    """A record that cannot be trained on; the caller adds the file and record."""


def check_conversation(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConversationError("'messages' must be a non-empty list of {role, content} objects")
    for turn, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError(f"turn {turn} is not a {{role, content}} object: {m!r}")
        if m["role"] not in ROLES:
            raise ConversationError(f"turn {turn} has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ConversationError(f"turn {turn}: content must be text, found {m['content']!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("the conversation has no assistant turn (nothing to train on)")


def from_sharegpt(conversation) -> list[dict]:
    """ShareGPT turns (``{from, value}``) as chat messages (``{role, content}``)."""
    if not isinstance(conversation, list) or not conversation:
        raise ConversationError("'conversations' must be a non-empty list of {from, value} objects")
    messages = []
    for turn, t in enumerate(conversation):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise ConversationError(f"turn {turn} is not a {{from, value}} object: {t!r}")
        if t["from"] not in SHAREGPT_ROLES:
            raise ConversationError(f"turn {turn} is from {t['from']!r}, not a known ShareGPT speaker "
                                    f"({', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return messages


def check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.template=chat needs a chat template, and the tokenizer of "
                         f"{getattr(tokenizer, 'name_or_path', 'this model')} has none (add 'chat_template' to "
                         "tokenizer_config.json or a chat_template.jinja beside it, then convert again)")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("data.template=chat needs a fast tokenizer (character offsets locate the assistant turns)")


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise ConversationError(f"the tokenizer's chat template renders turn {i} differently inside the "
                                    "whole conversation than after its prefix, so its assistant tokens cannot be "
                                    "located; use a template that renders prefixes consistently")
        spans.append((len(before), len(through)))
    return full, spans


def encode_conversation(tokenizer, messages) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask): 1 on the tokens that start inside an assistant turn."""
    check_conversation(messages)
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(ids), np.float32)
    for lo, hi in spans:
        mask[(starts >= lo) & (starts < hi)] = 1.0
    return ids, mask
