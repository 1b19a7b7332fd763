"""data.template=chat: the tokenizer's own chat template renders the conversation, the loss
covers every assistant turn (with its end-of-turn tokens) and nothing else; bad records are
errors naming the file and line."""

import json

import pytest
from hf_tiny import make_tokenizer

from milora_megatron.data import tokenize_examples

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "You add numbers."},
                {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "2 plus 3 is 5."},
                {"role": "user", "content": "And 4 plus 4?"},
                {"role": "assistant", "content": "4 plus 4 is 8."}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    texts = [json.dumps(CONVERSATION)] * 20
    make_tokenizer(str(path), texts, vocab=400)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_every_assistant_turn_and_only_those_is_scored(tokenizer, tmp_path):
    [(ids, mask)] = tokenize_examples(_write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}]), "chat", tokenizer)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    scored = tokenizer.decode(ids[mask > 0])
    assert scored == "2 plus 3 is 5.<|im_end|>\n4 plus 4 is 8.<|im_end|>\n"
    assert "What is" not in scored and "<|im_start|>assistant" not in scored


@pytest.mark.parametrize("records,message", [
    ([{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "hi"}]}],
     "line 2: the conversation has no assistant turn"),
    ([{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
     "line 1: turn 0 has unknown role 'bot'"),
    ([{"messages": CONVERSATION}, {"text": "no messages"}], "line 2: missing field(s) ['messages']"),
])
def test_bad_records_name_the_file_and_line(tokenizer, tmp_path, records, message):
    path = _write(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError) as info:
        tokenize_examples(path, "chat", tokenizer)
    assert path in str(info.value) and message in str(info.value)


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer, tmp_path):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="needs a chat template"):
        tokenize_examples(_write(tmp_path / "c.jsonl", [{"messages": CONVERSATION}]), "chat", plain)
