"""The trainer on data named as users name it: Hub dataset ids read offline from a Hub cache
laid out as huggingface_hub lays it out, a column map, a validation split, ShareGPT
conversations, the commit recorded and held on resume, and a missing id refused in one line."""

import json

import numpy as np
import pytest
from hf_tiny import alpaca_records
from hub_cache import CHATML, SHAREGPT, add_commit, as_messages, jsonl_bytes, offline_env, parquet_bytes, renamed
from trainer_runs import TORCHRUN_WRAPPER, common, make_inputs, records, run, torchrun

OLD, NEW, NEWER = "1" * 40, "2" * 40, "3" * 40
COLUMNS = "question:instruction,context:input,answer:output"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_data")
    ckpt = make_inputs(root, chat_template=CHATML)
    hf_home = str(root / "hf_home")
    splits = {"train": parquet_bytes(renamed(alpaca_records(48))), "test": parquet_bytes(renamed(alpaca_records(8, 1)))}
    files = {f"data/{split}-00000-of-00001.parquet": data for split, data in splits.items()}
    add_commit(f"{hf_home}/hub", "acme/qa", {**files, "data/train-00000-of-00001.parquet":
                                             parquet_bytes(renamed(alpaca_records(24)))}, OLD)
    add_commit(f"{hf_home}/hub", "acme/qa", files, NEW)
    add_commit(f"{hf_home}/hub", "acme/chats", {"sharegpt.jsonl": jsonl_bytes(SHAREGPT)}, NEW)
    return root, ckpt, hf_home, splits


def _args(inputs, out, **extra):
    root, ckpt = inputs[:2]
    return common(root, ckpt, out, **{"parallel.tp": 1, "train.seq_len": 128, **extra})


def _run_json(out) -> dict:
    return json.loads((out / "run.json").read_text())


def test_a_parquet_repo_through_a_column_map_trains_records_its_commit_and_holds_it_on_resume(inputs, tmp_path):
    root, _, hf_home, splits = inputs
    out = tmp_path / "run"
    args = _args(inputs, out, **{"data.train": "acme/qa", "data.columns": COLUMNS, "data.valid_split": "test",
                                 "train.iters": 2})
    run(1, args, env=offline_env(hf_home))
    data = _run_json(out)["data"]
    assert data["train"] == {"name": "acme/qa", "commit": NEW, "subset": "", "split": "train",
                             "columns": {"question": "instruction", "context": "input", "answer": "output"}}
    assert data["valid"]["split"] == "test" and data["valid"]["commit"] == NEW
    assert [r for r in records(out) if "valid_loss" in r]  # validation from the test split
    # the branch moves upstream: the same command would train on other data, and is refused
    add_commit(f"{hf_home}/hub", "acme/qa", {"data/test-00000-of-00001.parquet": splits["test"],
                                             "data/train-00000-of-00001.parquet":
                                             parquet_bytes(renamed(alpaca_records(30, seed=5)))}, NEWER)
    before = records(out)
    text = run(1, args, ok=False, env=offline_env(hf_home))
    assert run.returncode != 0 and f"now resolves to commit {NEWER}, and this run was trained on {NEW}: resume with " \
                                   f"data.revision={NEW}" in text, text[-3000:]
    assert records(out) == before
    run(1, [*args, f"data.revision={NEW}"], env=offline_env(hf_home))  # as the refusal advises


def test_sharegpt_conversations_train_on_the_assistant_turns_only(inputs, tmp_path):
    from transformers import AutoTokenizer

    root, _, hf_home, _ = inputs
    out = tmp_path / "run"
    run(1, _args(inputs, out, **{"data.train": "acme/chats", "data.template": "chat", "train.iters": 1,
                                 "train.global_batch": len(SHAREGPT), "train.seq_len": 256}), env=offline_env(hf_home))
    # every conversation once in the step: its scored tokens are transformers' assistant tokens
    tok = AutoTokenizer.from_pretrained(str(root / "hf"))
    expected = sum(int(np.sum(tok.apply_chat_template(as_messages(r), tokenize=True, return_dict=True,
                                                      return_assistant_tokens_mask=True)["assistant_masks"]))
                   for r in SHAREGPT)
    [step] = [r for r in records(out) if "loss" in r]
    assert step["loss_tokens"] == expected and np.isfinite(step["loss"])
    assert _run_json(out)["data"]["train"]["commit"] == NEW


def test_a_dataset_missing_from_the_offline_cache_is_one_line_and_nothing_trains(inputs, tmp_path):
    hf_home = inputs[2]
    out = tmp_path / "run"
    proc = torchrun(1, _args(inputs, out, **{"data.train": "acme/absent"}), env=offline_env(hf_home),
                    launcher=TORCHRUN_WRAPPER)
    text, _ = proc.communicate(timeout=300)
    ours = [line for line in text.splitlines() if line.startswith("pretrain_milora: error:")]
    assert proc.returncode != 0 and len(ours) == 1, text[-3000:]
    assert "acme/absent is not a local path, and the dataset (revision main) is not in the Hugging Face cache" in ours[0]
    assert "HF_HUB_OFFLINE=1: unset HF_HUB_OFFLINE" in ours[0] and "Traceback" not in text
    assert not records(out) and not (out / "checkpoints").exists()


def test_a_held_out_fraction_validates_on_examples_never_trained_on(inputs, tmp_path):
    hf_home = inputs[2]
    out = tmp_path / "run"
    run(1, _args(inputs, out, **{"data.train": "acme/qa", "data.columns": COLUMNS, "data.valid_fraction": 0.25,
                                 "train.iters": 1, "train.global_batch": 4, "train.seq_len": 256}),
        env=offline_env(hf_home))
    [step] = [r for r in records(out) if "loss" in r]
    assert step["epoch"] == round(4 / 36, 4)  # 12 of the 48 examples held out, 36 trained on
    assert [r for r in records(out) if "valid_loss" in r]
    assert "valid" not in _run_json(out)["data"]  # validation came from data.train itself
