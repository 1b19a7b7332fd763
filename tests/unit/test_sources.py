"""milora_megatron/data/sources.py: Hub dataset ids resolved offline from a Hub cache laid out
as huggingface_hub lays it out, subsets and splits, data.columns, ShareGPT conversations,
and each bad input answered in one line."""

import json

import numpy as np
import pytest
from hf_tiny import alpaca_records, make_tokenizer
from hub_cache import CHATML, SHAREGPT, add_commit, as_messages, jsonl_bytes, parquet_bytes, renamed

from milora_megatron.data import tokenize_examples
from milora_megatron.data.sources import open_records, parse_columns, resolve
from milora_megatron.errors import ConfigError, DataError, MissingPathError

OLD, NEW = "1" * 40, "2" * 40
COLUMNS = "question:instruction,context:input,answer:output"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache with a parquet repo (train/test splits, two commits, two subsets in a
    second repo) and a ShareGPT jsonl repo; the tokenizer knows their words."""
    root = tmp_path_factory.mktemp("hub")
    cache = str(root / "hub")
    train, test = alpaca_records(24), alpaca_records(6, seed=3)
    add_commit(cache, "acme/qa", {"data/train-00000-of-00001.parquet": parquet_bytes(renamed(train[:12])),
                                  "data/test-00000-of-00001.parquet": parquet_bytes(renamed(test))}, OLD)
    add_commit(cache, "acme/qa", {"data/train-00000-of-00001.parquet": parquet_bytes(renamed(train)),
                                  "data/test-00000-of-00001.parquet": parquet_bytes(renamed(test))}, NEW)
    readme = ("---\nconfigs:\n- config_name: easy\n  data_files:\n  - split: train\n    path: easy.jsonl\n"
              "- config_name: hard\n  data_files:\n  - split: train\n    path: hard.jsonl\n---\n").encode()
    add_commit(cache, "acme/levels", {"README.md": readme, "easy.jsonl": jsonl_bytes(train[:4]),
                                      "hard.jsonl": jsonl_bytes(train[4:8])}, NEW)
    add_commit(cache, "acme/chats", {"sharegpt.jsonl": jsonl_bytes(SHAREGPT)}, NEW)
    texts = [json.dumps(r) for r in train + test] * 4 + [json.dumps(SHAREGPT) + CHATML] * 4
    make_tokenizer(str(root / "tok"), texts, vocab=512)
    with open(root / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train)
    return root, cache


@pytest.fixture
def offline(hub, monkeypatch):
    from huggingface_hub import constants

    root, cache = hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


@pytest.fixture(scope="module")
def tokenizer(hub):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hub[0] / "tok"))
    tok.chat_template = CHATML
    return tok


def test_a_hub_parquet_repo_through_a_column_map_tokenises_as_the_alpaca_file(offline, tokenizer):
    source = resolve("acme/qa", columns=COLUMNS)
    assert source.commit == NEW and source.record() == {
        "name": "acme/qa", "commit": NEW, "subset": "", "split": "train",
        "columns": {"question": "instruction", "context": "input", "answer": "output"}}
    hub_examples = tokenize_examples(source, "alpaca", tokenizer)
    file_examples = tokenize_examples(str(offline / "train.jsonl"), "alpaca", tokenizer)
    assert len(hub_examples) == 24
    for (ids, mask), (ref_ids, ref_mask) in zip(hub_examples, file_examples):
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(mask, ref_mask)
    test = tokenize_examples(source.with_split("test"), "alpaca", tokenizer)
    assert len(test) == 6


def test_a_revision_reads_that_commit(offline):
    assert len(open_records(resolve("acme/qa", revision=OLD))) == 12
    assert len(open_records(resolve("acme/qa"))) == 24


def test_a_subset_is_chosen_by_its_config_name(offline):
    source = resolve("acme/levels", subset="hard")
    assert open_records(source)["instruction"] == [r["instruction"] for r in alpaca_records(24)[4:8]]
    with pytest.raises(DataError, match=r"several subsets .*\['easy', 'hard'\]"):
        open_records(resolve("acme/levels"))


def test_sharegpt_conversations_score_the_assistant_turns_only(offline, tokenizer):
    """Against transformers' own assistant mask ({% generation %} in the template)."""
    examples = tokenize_examples(resolve("acme/chats"), "chat", tokenizer)
    assert len(examples) == len(SHAREGPT)
    for (ids, mask), record in zip(examples, SHAREGPT):
        ref = tokenizer.apply_chat_template(as_messages(record), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        np.testing.assert_array_equal(ids, ref["input_ids"])
        np.testing.assert_array_equal(mask, np.asarray(ref["assistant_masks"], np.float32))
        assert mask.sum() > 0


@pytest.mark.parametrize("call, error, message", [
    (lambda: resolve("acme/missing"), MissingPathError,
     r"acme/missing is not a local path, and the dataset \(revision main\) is not in the Hugging Face cache .* "
     r"while HF_HUB_OFFLINE=1: unset HF_HUB_OFFLINE"),
    (lambda: resolve("acme/qa", revision="v9"), MissingPathError, r"revision v9\) is not in the Hugging Face cache"),
    (lambda: open_records(resolve("acme/qa", split="validation")), DataError,
     r"acme/qa \(commit 222222222222\) has no split 'validation'; its splits: \['train', 'test'\]"),
    (lambda: open_records(resolve("acme/levels", subset="medium")), DataError,
     r"has no subset 'medium'; its subsets: \['easy', 'hard'\]"),
    (lambda: open_records(resolve("acme/qa", columns={"query": "instruction"})), DataError,
     r"acme/qa, split 'train': data.columns names column\(s\) \['query'\] that it does not have; its columns: "
     r"\['question', 'context', 'answer'\]"),
    (lambda: open_records(resolve("missing/train.jsonl")), MissingPathError, r"data file missing/train.jsonl does not exist"),
])
def test_bad_sources_are_one_line(offline, call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_template_fields_missing_after_the_map_list_the_columns(offline, tokenizer):
    with pytest.raises(DataError, match=r"missing field\(s\) \['instruction', 'output'\] required by the 'alpaca' "
                                        r"template \(its columns: \['question', 'context', 'answer'\]"):
        tokenize_examples(resolve("acme/qa"), "alpaca", tokenizer)


def test_an_unknown_sharegpt_speaker_names_the_record(tmp_path, tokenizer):
    bad = [SHAREGPT[0], {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "hello"}]}]
    path = tmp_path / "chats.jsonl"
    path.write_bytes(jsonl_bytes(bad))
    with pytest.raises(DataError, match=r"chats.jsonl, line 2: turn 1 is from 'robot', not a known ShareGPT speaker"):
        tokenize_examples(str(path), "chat", tokenizer)


def test_column_maps_parse_from_the_command_line_and_yaml():
    assert parse_columns("question:instruction, answer:output") == (("question", "instruction"), ("answer", "output"))
    assert parse_columns({"question": "instruction"}) == (("question", "instruction"),)
    with pytest.raises(ConfigError, match="'question' is not key:value"):
        parse_columns("question")
    with pytest.raises(ConfigError, match=r"more than one column onto \['output'\]"):
        parse_columns("a:output,b:output")


def test_a_column_named_like_a_mapped_field_gives_way(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes([{"instruction": "old", "prompt": "new", "output": "x"}]))
    records = open_records(resolve(str(path), columns="prompt:instruction"))
    assert records.column_names == ["instruction", "output"] and records[0]["instruction"] == "new"
