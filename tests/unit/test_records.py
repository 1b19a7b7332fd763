"""milora_megatron/data: templates, tokenisation (batched, cached), samples and packing."""

import json
import os

import pytest
from hf_tiny import alpaca_records, make_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer trained on the records, in an HF-style folder (root, folder)."""
    root = tmp_path_factory.mktemp("records")
    records = alpaca_records(48)
    make_tokenizer(str(root / "hf"), [json.dumps(r) for r in records] * 4, vocab=512)
    with open(root / "train.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return root, str(root)


def test_loss_mask_covers_the_response_only(setup):
    from transformers import AutoTokenizer

    from milora_megatron.data import tokenize_examples

    root, ckpt = setup
    tok = AutoTokenizer.from_pretrained(os.path.join(ckpt, "hf"))
    records = [json.loads(line) for line in open(root / "train.jsonl")]
    for (ids, mask), rec in zip(tokenize_examples(str(root / "train.jsonl"), "alpaca", tok), records):
        scored = ids[mask > 0].tolist()
        assert scored[-1] == tok.eos_token_id
        assert tok.decode(scored[:-1]) == rec["output"]
        assert rec["instruction"] in tok.decode(ids[mask == 0].tolist())
        assert ids[0] == tok.bos_token_id


def test_missing_template_field_names_file_and_line(setup, tmp_path):
    from transformers import AutoTokenizer

    from milora_megatron.data import tokenize_examples

    _, ckpt = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    tok = AutoTokenizer.from_pretrained(os.path.join(ckpt, "hf"))
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: missing field\(s\) \['output'\]"):
        tokenize_examples(str(bad), "alpaca", tok)


def test_tokenised_once_then_loaded_from_the_cache(setup, tmp_path, monkeypatch):
    """The first process on a node tokenises (batched); the others load datasets' cache: a
    second identical call runs the tokenizer on nothing."""
    from transformers import AutoTokenizer

    from milora_megatron.data import tokenize_examples

    root, ckpt = setup
    data = tmp_path / "fresh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records(30, seed=5)))
    tok = AutoTokenizer.from_pretrained(os.path.join(ckpt, "hf"))
    calls = []
    original = type(tok).__call__

    def counting(self, text, *args, **kwargs):
        calls.append(len(text) if isinstance(text, list) else 1)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting)
    first = tokenize_examples(str(data), "alpaca", tok)
    assert calls == [30, 30]  # one batched call for the prompts, one for the responses
    again = tokenize_examples(str(data), "alpaca", tok)
    assert len(calls) == 2  # the cache answered
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(first, again))


def _examples():
    import numpy as np

    return [(np.array([1, 2, 3]), np.array([0, 1, 1], np.float32)),
            (np.array([4, 5, 6, 7, 8]), np.array([0, 0, 1, 1, 1], np.float32))]


def test_samples_truncate_and_pad():
    from milora_megatron.data import to_samples

    tokens, masks, positions = to_samples(_examples(), seq_len=3, pad_id=0, pack=False)
    assert tokens.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]] and positions is None  # seq_len + 1 tokens per sample
    assert masks.tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]  # padding is not scored


def test_packing_concatenates_and_drops_the_remainder():
    from milora_megatron.data import to_samples

    tokens, masks, positions = to_samples(_examples(), seq_len=2, pad_id=0, pack=True)
    assert tokens.tolist() == [[1, 2, 3], [4, 5, 6]]  # 8 tokens -> two windows of 3, 2 dropped
    assert masks.tolist() == [[0, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 1, 2]]  # each example's own positions
    tokens, _, positions = to_samples(_examples(), seq_len=3, pad_id=0, pack=True)
    assert tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert positions.tolist() == [[0, 1, 2, 0], [1, 2, 3, 4]]  # an example cut by the window keeps counting
    short, _, _ = to_samples(_examples(), seq_len=20, pad_id=0, pack=True)  # shorter than one window: padded
    assert short.shape == (2, 21)


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"\n\n", "holds no records"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "line 2 is not valid JSON"),
    (b'{"instruction": "a", "output": "b"}\n[1, 2]\n', "line 2 is not a JSON object"),
    (b'{"instruction": "a", "output": 5}\n', "line 1: field 'output' must be text, found 5"),
    (b'{"instruction": "a", "output": "x"}\n{"instruction": "a", "output": 5}\n', "line 2: field 'output' must be text"),
    (b'{"instruction": "a", "output": "x"}\n{"instruction": "a", "output": "\xff\xfe"}\n', "line 2: bytes that are not UTF-8"),
])
def test_data_errors_name_the_file_and_line(setup, tmp_path, content, message):
    from transformers import AutoTokenizer

    from milora_megatron.data import tokenize_examples

    _, ckpt = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    tok = AutoTokenizer.from_pretrained(os.path.join(ckpt, "hf"))
    with pytest.raises(ValueError) as info:
        tokenize_examples(str(bad), "alpaca", tok)
    assert str(info.value).startswith(str(bad)) and message in str(info.value)
